"""Generation: images for fixed prompts and seeds from the base and trained models, as Ray Data batch inference."""
