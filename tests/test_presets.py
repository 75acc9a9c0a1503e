import pytest
import torch

from dclip.presets import small_clip_config
from modeling_dclip import DCLIPModel


def test_small_clip_config_fits_the_tokenizer(tokenizer):
    config = small_clip_config(tokenizer, image_size=32, preset="clip-tiny")
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.max_position_embeddings == tokenizer.model_max_length
    model = DCLIPModel(config).eval()
    ids = tokenizer(["a red circle", "two blue squares above a star"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits_per_image.shape == (2, 2)
    # pooling reads the first end-of-text token: padding after it must not change the text embedding
    with torch.no_grad():
        single = model.get_text_features(**tokenizer(["a red circle"], return_tensors="pt"))
    torch.testing.assert_close(single[0], model.get_text_features(**ids)[0], atol=1e-5, rtol=0)


def test_small_clip_config_errors_name_the_argument(tokenizer):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        small_clip_config(tokenizer, preset="huge")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        small_clip_config(tokenizer, image_size=60)
