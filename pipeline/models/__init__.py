"""Model loading (loader), the tiny SDXL / SD1.5 factory (tiny), prompt encoding (text) and OpenCLIP embeddings
(clip). Import from the submodules: each pulls in only the libraries it needs (diffusers, open_clip)."""
