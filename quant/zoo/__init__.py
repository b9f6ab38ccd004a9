"""Models the project trains itself (the offline ``demo`` ViT)."""
