"""The torch-free tokenizer the gateway uses: chat rendering matches transformers, compiled once."""

from specserve import tokenizer as tokenizers

CHATS = (
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."},
     {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "In place?"}],
)


def test_chat_rendering_matches_transformers_and_compiles_the_template_once(tiny_dir, monkeypatch):
    from transformers import AutoTokenizer

    ours = tokenizers.load_tokenizer(str(tiny_dir[0]))
    assert isinstance(ours, tokenizers.Tokenizer)
    theirs = AutoTokenizer.from_pretrained(tiny_dir[0])
    environments = []
    make = tokenizers._environment
    monkeypatch.setattr(tokenizers, "_environment", lambda: environments.append(1) or make())
    for chat in CHATS * 2:
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == list(theirs.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert len(environments) == 1
