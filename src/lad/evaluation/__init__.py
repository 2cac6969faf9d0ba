"""lad.evaluation"""
