"""The evaluation on the real SmolLM2-135M-Instruct at short lengths."""

import pytest

from seerattn_hf.evaluation.cli import ppl_main
from seerattn_hf.evaluation.models import resolve_model_path

pytestmark = pytest.mark.slow


def _embedded_or_skip():
    try:
        resolve_model_path("embedded:smollm2-135m")
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_eval_ppl_on_embedded_smollm2(tmp_path):
    _embedded_or_skip()
    summary = ppl_main(["--model", "embedded:smollm2-135m", "--lengths", "256", "--num_documents", "1",
                        "--methods", "dense", "oracle", "streaming", "--densities", "1.0", "0.3",
                        "--output", str(tmp_path)])
    rows = {r["label"]: r for r in summary["results"]}
    assert summary["results"][0]["per_document"][0]["title"] == "Hamlet"
    assert 5.0 < rows["dense"]["ppl"] < 60.0  # English verse, 135M model
    assert rows["oracle d=1"]["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-3)
    # Keeping the heaviest blocks beats keeping blocks by position at the same density.
    assert rows["oracle d=0.3"]["density"] == pytest.approx(rows["streaming d=0.3"]["density"])
    assert rows["dense"]["ppl"] < rows["oracle d=0.3"]["ppl"] < rows["streaming d=0.3"]["ppl"]


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
