"""Ray-distributed Diffusion-RPO preference alignment for text-to-image diffusion models."""
