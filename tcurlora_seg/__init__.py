"""tcurlora_seg: fine-tune a pretrained UNETR for 3-D MRI segmentation with tCURLoRA (tensor CUR LoRA) and its rivals."""

__version__ = "0.1.0"
__all__ = ["__version__"]
