"""The evaluation on the real SmolLM2-135M-Instruct at short lengths."""

import pytest

pytestmark = pytest.mark.slow


def test_perplexity_on_smollm2(smollm2):
    import seerattn_hf as sa
    from seerattn_hf.documents import load_document_records
    from seerattn_hf.evaluation.perplexity import document_windows, evaluate_perplexity
    from seerattn_hf.evaluation.settings import build_settings

    model, tokenizer = smollm2
    windows, _ = document_windows(tokenizer, load_document_records(), 256, num_documents=1)
    assert windows[0]["title"] == "Hamlet" and windows[0]["input_ids"][0, 0] == tokenizer.bos_token_id
    sa.apply_seer_attention(model, sa.SeerAttentionConfig())
    try:
        settings = build_settings(["dense", "oracle", "streaming"], densities=[1.0, 0.3])
        rows = {r["label"]: r for r in evaluate_perplexity(model, windows, settings)}
    finally:
        sa.remove_seer_attention(model)
    assert 5.0 < rows["dense"]["ppl"] < 60.0  # English verse, 135M model
    assert rows["oracle d=1"]["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-3)
    assert rows["oracle d=0.3"]["density"] == pytest.approx(rows["streaming d=0.3"]["density"])
    assert rows["dense"]["ppl"] < min(rows["oracle d=0.3"]["ppl"], rows["streaming d=0.3"]["ppl"])


def test_retrieval_prompts_and_dense_answers(smollm2):
    from seerattn_hf.data import load_default_corpus
    from seerattn_hf.evaluation.retrieval import ANSWER_PREFIX, PromptBuilder, evaluate_retrieval, haystack_text
    from seerattn_hf.evaluation.settings import AttentionSetting

    import seerattn_hf as sa

    model, tokenizer = smollm2
    builder = PromptBuilder(tokenizer, haystack_text(load_default_corpus("test")[:1]))
    assert builder.use_chat_template
    prompts = [builder.build(task, 600, depth, 0) for task in ("niah_single", "niah_multikey") for depth in (0.0, 0.5)]
    for prompt in prompts:
        text = tokenizer.decode(prompt.input_ids[0])
        assert abs(prompt.input_ids.shape[1] - 600) <= 2
        assert text.startswith("<|im_start|>system") and text.endswith(ANSWER_PREFIX.format(key=prompt.key))
        needle = f"The special magic number for {prompt.key} is {prompt.answer}."
        assert text.count(needle) == 1
        position = text.index(needle) / len(text)
        assert position == pytest.approx(prompt.depth, abs=0.25)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig())
    try:
        results = evaluate_retrieval(model, tokenizer, prompts[:2], [AttentionSetting("dense")], max_new_tokens=12)
    finally:
        sa.remove_seer_attention(model)
    assert [r["accuracy"] for r in results] == [1.0, 1.0], [r["samples"][0]["generated"] for r in results]
