"""Priors: organ masks for unlabeled CT, from a segmenter trained in lad or from TotalSegmentator."""
