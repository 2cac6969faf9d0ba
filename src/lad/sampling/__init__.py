"""lad.sampling"""
