"""lad.priors"""
