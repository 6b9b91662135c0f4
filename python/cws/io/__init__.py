"""Reading and writing safetensors checkpoints tensor by tensor, with bounded memory."""
