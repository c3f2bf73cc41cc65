"""Pretraining of the shipped `tiny` CLIP on a generated image–caption corpus (offline).

`corpus.py` draws scenes and captions; `train.py` runs the contrastive loss; `python -m
fastprompt.pretrain` reproduces `fastprompt/weights/tiny-shapes.safetensors`.
"""
