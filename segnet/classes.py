"""CamVid's 11 classes in the SegNet labels' order, and the void label that loss and metrics ignore."""

CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
NUM_CLASSES = len(CLASSES)
VOID = 11  # "Unlabelled" in the SegNet CamVid labels, ignored by loss and metrics
