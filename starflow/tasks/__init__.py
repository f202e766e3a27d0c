"""What a trained flow is used for beyond sampling: exact encoding (image <-> noise), inpainting, editing."""
