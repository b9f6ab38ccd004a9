"""Models the project trains itself (the offline ``demo`` ViT; trained by ``python -m bench.train_demo``)."""
