import pytest
from transformers import AutoTokenizer

from seerattn_hf.evaluation.retrieval import ANSWER_PREFIX, NEEDLE, PromptBuilder, is_correct


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needles_land_at_their_depth_in_a_prompt_of_the_asked_length(tiny_checkpoint, depth):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    # A haystack much shorter than the prompt: it is repeated.
    builder = PromptBuilder(tokenizer, "The king is dead. Long live the king!\nExeunt all. " * 20)
    assert not builder.use_chat_template
    prompt = builder.build("niah_multikey", 1500, depth, sample=0, num_needles=3)
    text = tokenizer.decode(prompt.input_ids[0])
    assert abs(prompt.input_ids.shape[1] - 1500) <= 2 and prompt.input_ids[0, 0] == tokenizer.bos_token_id
    assert text.endswith(ANSWER_PREFIX.format(key=prompt.key))
    assert text.count("The special magic number for") == 3 + 1  # the needles and the answer prefix
    needle = NEEDLE.format(key=prompt.key, value=prompt.answer)
    context_start, context_end = text.index("afterwards.") + 11, text.rindex("What is the special")
    assert (text.index(needle) - context_start) / (context_end - context_start) == pytest.approx(depth, abs=0.1)


def test_answers_are_matched_on_their_digits():
    assert is_correct("1234567", " 1234567.")
    assert is_correct("1234567", " 1 2 3 4 5 6 7")
    assert not is_correct("1234567", " 1234568.")
