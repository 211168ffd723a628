"""MMLU probe prompts, tokenized as KVA reads them."""

from loki_exp.data.mmlu import ProbeSpec, load_probe, render_prompt


def mmlu_prompts(tokenizer, n=3):
    return [tokenizer(render_prompt(tokenizer, it), return_tensors="pt",
                      add_special_tokens=False).input_ids
            for it in load_probe(ProbeSpec(samples_per_subject=1, limit=n)).items]
