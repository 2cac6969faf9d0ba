"""lad.downstream"""
