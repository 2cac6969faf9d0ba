"""lad.training"""
