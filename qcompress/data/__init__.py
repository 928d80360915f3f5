"""Dataset readers (VOC, COCO), the generated default dataset, transforms and calibration subsets."""
