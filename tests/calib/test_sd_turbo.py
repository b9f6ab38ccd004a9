import pytest
import torch

from calib import sd_turbo as S
from lowbit.errors import UserError

TEXT = "abcdefghij klmnopqrst"  # 20 byte-level tokens with the tiny tokenizer


def test_manual_one_step_equals_stock_pipeline(tiny_pipe, sd, gen):
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    ref = tiny_pipe(prompt=[TEXT, TEXT[::-1]], latents=noise.clone(), num_inference_steps=1, guidance_scale=0.0,
                    output_type="pt", height=16, width=16).images
    emb = torch.stack([S.description_token_embeddings(sd, t, 20) for t in (TEXT, TEXT[::-1])])
    assert emb.shape == (2, 20, sd.token_dim)
    cond, _ = S.encode_prompt_embeddings(sd, emb)
    torch.testing.assert_close(cond, S.encode_text(sd, [TEXT, TEXT[::-1]]), rtol=0, atol=1e-6)
    out = S.one_step_generate(sd, cond, noise)
    assert out.shape == ref.shape == (2, 3, 16, 16) and ref.std() > 0.05
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-4  # the prompt matters


def test_one_step_is_timestep_999_trailing(sd):
    sigma, t = S.one_step_sigma(sd.scheduler)
    alphas = sd.scheduler.alphas_cumprod
    assert t == 999
    assert sigma == pytest.approx(float(((1 - alphas[999]) / alphas[999]) ** 0.5), rel=1e-5)


def test_eos_position_is_pooled_output(sd, gen):
    emb = torch.randn(3, 20, sd.token_dim, generator=gen) * 0.05
    ids, eos = S.prompt_input_ids(sd.tokenizer, 20, 3)
    assert eos == 21 and (ids[:, eos] == sd.tokenizer.eos_token_id).all() and (ids[:, 0] == sd.tokenizer.bos_token_id).all()
    cond, pooled = S.encode_prompt_embeddings(sd, emb)
    with S.inject_token_embeddings(sd.text_encoder, emb):
        ref = sd.text_encoder(ids).pooler_output
    torch.testing.assert_close(pooled, ref, rtol=0, atol=0)
    # the hook is removed afterwards and position embeddings still apply: same tokens at other positions differ
    plain = sd.text_encoder(ids)[0]
    assert (plain[:, 1:21] - cond[:, 1:21]).abs().max() > 1e-3


def test_too_many_tokens_and_missing_model_raise(sd):
    with pytest.raises(ValueError, match="exceed"):
        S.prompt_input_ids(sd.tokenizer, sd.tokenizer.model_max_length, 1)
    with pytest.raises(UserError, match="--sd-path '/nonexistent/sd-turbo' does not exist"):
        S.load_sd_turbo("/nonexistent/sd-turbo")


def test_sd_path_checks_fail_fast(tmp_path, monkeypatch):
    from calib import common

    with pytest.raises(UserError, match="no model_index.json"):
        S.check_sd_path(str(tmp_path))
    monkeypatch.setattr(common, "hub_online", lambda: False)
    with pytest.raises(UserError, match="neither a local folder nor in the hub cache.*--sd-path /path/to/sd-turbo"):
        S.load_sd_turbo("nobody-i20/no-such-model")
    monkeypatch.setattr(common, "hub_online", lambda: True)
    S.check_sd_path("nobody-i20/no-such-model")  # online: left to the download
