"""The decoder's tokenizer: a `tokenizers.Tokenizer` (tokenizer.json) plus the special tokens and
the chat template of tokenizer_config.json, rendered as transformers renders it (qwen2.py loads
it beside the model; experiments/t5.py subclasses it for T5's plain-text prompts)."""
import json
from pathlib import Path

import tokenizers

from errors import InputError

# Plain ChatML, for a tokenizer directory that stores no chat template of its own.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n'"
          " + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of
    `tokenizer_config.json`."""
    end_of_turn = "<|im_end|>"  # what ends a training response (lora.encode_example)
    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict):
        self.tokenizer, self.config = tokenizer, config
        self.chat_template = config.get("chat_template") or CHATML
        special = {}
        for name in ("bos_token", "eos_token", "pad_token"):  # text, or {"content": text, ...}
            token = config.get(name)
            special[name] = token.get("content") if isinstance(token, dict) else token
        # end of turn first
        ends = ("<|im_end|>", special["eos_token"], "<|endoftext|>")
        ids = [tokenizer.token_to_id(t) for t in ends if t]
        self.eos_token_ids = list(dict.fromkeys(i for i in ids if i is not None))
        if not self.eos_token_ids:
            raise InputError("tokenizer has neither <|im_end|> nor an eos_token")
        pad = tokenizer.token_to_id(special["pad_token"]) if special["pad_token"] else None
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self._special = {k: v or "" for k, v in special.items()}
        self._template = None

    @classmethod
    def from_dir(cls, directory) -> "Tokenizer":
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise InputError(f"{directory / 'tokenizer.json'}: missing")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (directory / "chat_template.jinja").is_file():  # newer hub repos keep it apart
            config["chat_template"] = (directory / "chat_template.jinja").read_text()
        return cls(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")), config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The model's own jinja chat template rendered as transformers does (sandboxed,
        trim_blocks, lstrip_blocks)."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = (
                lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent))
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special)

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = dict(self.config, chat_template=self.chat_template)
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text)
