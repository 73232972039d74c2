"""What a manifest row means: synthesis, editing, compositing and augmentation presets."""
