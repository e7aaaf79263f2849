"""Train the digits ViT fixture (see loraprune.pipeline.vit_digits): python scripts/train_vit_digits.py --output DIR"""

from loraprune.pipeline.vit_digits import main

if __name__ == "__main__":
    main()
