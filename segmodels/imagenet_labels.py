"""Which ImageNet-1k classes (torchvision's index order) depict each object label, by label name.

MultiPathNet's label head adds, for every label, the log of the ImageNet classifier's probability mass on the
classes below (``imagenet_prior``). ~580 training instances over 80 COCO classes are too few to learn most
classes from (held-out top-1 0.44 from the foveal towers alone, README), but the frozen ImageNet classifier
already tells dogs, pizzas, buses and laptops apart. The table is written from the class definitions only
(WordNet synsets of ImageNet-1k, COCO category names), never from images. COCO classes without a fitting
ImageNet class (giraffe, frisbee, kite, carrot, ...) get an empty set and are learned from data alone, as are
a project's own label names unless they match an entry or alias here (case-insensitively).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGENET_CLASSES = 1000
# A label's prior is log(mass + PRIOR_FLOOR): labels without ImageNet classes get a constant, which the
# head's per-label bias absorbs.
PRIOR_FLOOR = 1e-4

_BIRDS = [*range(7, 25), *range(80, 101), *range(127, 147)]
_DOGS = list(range(151, 269))
_CLOTHING = [399, 400, 411, 445, 459, 465, 474, 501, 515, 518, 560, 568, 578, 601, 608, 610, 614, 617, 638]
_CLOTHING += [639, 652, 655, 667, 689, 735, 775, 808, 824, 834, 836, 837, 841, 842, 869, 887, 903]

IMAGENET_CLASSES_OF: dict[str, list[int]] = {
    # People: ballplayer, groom, scuba diver, and what ImageNet's classifier sees on a person (garments).
    "person": [981, 982, 983, *_CLOTHING],
    "bicycle": [444, 671, 870, 880],
    "car": [407, 436, 468, 475, 479, 511, 573, 575, 581, 609, 627, 656, 661, 734, 751, 817],
    "motorcycle": [665, 670],
    "airplane": [404, 895, 908],
    "bus": [654, 779, 874],
    "train": [466, 547, 565, 705, 820, 829],
    "truck": [555, 569, 586, 675, 717, 864, 866, 867],
    "boat": [403, 472, 484, 510, 554, 576, 625, 628, 693, 694, 724, 780, 814, 833, 871, 914],
    "traffic light": [920],
    "stop sign": [919],
    "parking meter": [704],
    "bench": [703],
    "bird": _BIRDS,
    "cat": [281, 282, 283, 284, 285],
    "dog": _DOGS,
    "horse": [339, 603],
    "sheep": [348, 349],
    "cow": [345, 346, 347],
    "elephant": [101, 385, 386],
    "bear": [294, 295, 296, 297],
    "zebra": [340],
    "backpack": [414],
    "umbrella": [879],
    "handbag": [636, 748, 893],
    "tie": [451, 457, 906],
    "skis": [795],
    "sports ball": [429, 430, 522, 574, 722, 768, 805, 852, 890],
    "tennis racket": [752],
    "bottle": [440, 720, 737, 898, 901, 907],
    "wine glass": [572, 966],
    "cup": [441, 504, 968],
    "knife": [499, 623],
    "spoon": [618, 910],
    "bowl": [659, 809],
    "banana": [954],
    "apple": [948],
    "sandwich": [930, 933],
    "orange": [950, 951],
    "broccoli": [937, 938],
    "hot dog": [934],
    "pizza": [963],
    "donut": [931],
    "chair": [423, 559, 765, 857],
    "couch": [831],
    "potted plant": [738],
    "bed": [520, 564, 721, 750],
    "dining table": [532],
    "toilet": [861],
    "tv": [548, 598, 664, 782, 851],
    "laptop": [620, 681],
    "mouse": [673],
    "remote": [761],
    "keyboard": [508, 810, 878],
    "cell phone": [487, 590, 605],
    "microwave": [651],
    "oven": [766, 827],
    "toaster": [859],
    "sink": [896],
    "refrigerator": [760],
    "book": [453, 917, 921],
    "clock": [409, 530, 892],
    "vase": [883],
    "teddy bear": [850],
    "hair drier": [589],
}

# Other common spellings of the same objects (Pascal VOC, COCO's own variants, plurals).
ALIASES: dict[str, str] = {
    "people": "person",
    "pedestrian": "person",
    "bike": "bicycle",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "plane": "airplane",
    "ship": "boat",
    "sofa": "couch",
    "diningtable": "dining table",
    "table": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "monitor": "tv",
    "phone": "cell phone",
    "mobile phone": "cell phone",
    "hair dryer": "hair drier",
    "ball": "sports ball",
    "racket": "tennis racket",
    "doughnut": "donut",
    "hotdog": "hot dog",
    "fridge": "refrigerator",
    "puppy": "dog",
    "kitten": "cat",
}


def imagenet_classes(name: str) -> list[int]:
    """ImageNet-1k indices depicting the label ``name`` (case, surrounding spaces and a plural -s ignored);
    empty when the name is unknown."""
    key = " ".join(name.lower().split())
    for candidate in (key, key[:-1] if key.endswith("s") else key):
        candidate = ALIASES.get(candidate, candidate)
        if candidate in IMAGENET_CLASSES_OF:
            return IMAGENET_CLASSES_OF[candidate]
    return []


def other_label_classes(names: Sequence[str]) -> list[int]:
    """ImageNet-1k indices that depict a label of this table which none of ``names`` is (for a project
    labelling cups: the elephants, broccoli and knives, not the cups): what the frozen ImageNet classifier
    knows about objects outside a label set, which a model fine-tuned on that set alone does not."""
    claimed = {i for name in names for i in imagenet_classes(name)}
    known = {i for classes in IMAGENET_CLASSES_OF.values() for i in classes}
    return sorted(known - claimed)


def imagenet_prior(names: Sequence[str]) -> torch.Tensor:
    """``(1000, K)`` float 0/1 matrix: column k marks the ImageNet classes of ``names[k]``."""
    prior = torch.zeros(IMAGENET_CLASSES, len(names))
    for k, name in enumerate(names):
        prior[imagenet_classes(name), k] = 1.0
    return prior
