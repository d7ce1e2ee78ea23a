"""The data pipeline: files on disk -> verified samples -> training/validation batches.

    config      check_dataset: dataset YAML -> resolved paths, names; built-in/converted data on first use
    verify      finding images, checking images and label files, the cached label scan
    dataset     LoadImagesAndLabels (mosaic, letterbox, rectangular batches, image caches)
    augment     letterbox, random_perspective, augment_hsv, mixup, copy_paste, box_candidates
    loaders     create_dataloader (DDP samplers, seeded workers)
    sources     LoadImages / LoadStreams for detect.py
    convert     VOC/COCO -> YOLO, YOLO -> COCO ground truth (python -m data.convert)
    builtin     the generated built-in dataset
    throughput  loader images/s (python -m data.throughput)

Nothing is imported here, so `python -m data.convert` does not pay for torch.
"""
