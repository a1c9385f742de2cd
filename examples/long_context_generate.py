"""Long-context generation with duohead, using only the public API.

    python examples/long_context_generate.py                       # built-in ~3.5K-token document
    python examples/long_context_generate.py doc.txt --pattern my-pattern.json --sparsity 0.75

Loads SmolLM2-135M-Instruct, makes half of its KV heads streaming heads (sink + window cache) with the
shipped pattern, generates an answer (generate() prefills the prompt in chunks into a `DuoCache`), and prints how
much KV cache full attention would have needed. `duohead generate` is the full tool.
"""

import argparse

import torch

import duohead
from duohead.loading import load_model
from duohead.prompts import demo_document

parser = argparse.ArgumentParser()
parser.add_argument("prompt_file", nargs="?", help="a long document plus a question (default: built-in demo)")
parser.add_argument("--pattern", default="smollm2-135m-instruct", help="pattern file or shipped pattern name")
parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of KV heads that stream")
args = parser.parse_args()

model, tokenizer = load_model()  # the default SmolLM2-135M-Instruct; or load_model("path/to/folder")
duohead.enable(model, args.pattern, sparsity=args.sparsity)  # reversible: duohead.disable(model)

text = open(args.prompt_file).read() if args.prompt_file else demo_document(tokenizer)[0]
input_ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)["input_ids"]

# generate() builds a DuoCache sized once for prompt + answer (the retrieval KV never regrows) and, with
# prefill_chunk_size, feeds the prompt 512 tokens at a time, so a long prompt's activations never have to
# fit in memory at once.
with torch.no_grad():
    output = model.generate(input_ids, max_new_tokens=48, do_sample=False, prefill_chunk_size=512, return_dict_in_generate=True)
cache = output.cache if "cache" in output else output.past_key_values  # transformers < 5.24 calls it past_key_values

print(tokenizer.decode(output.sequences[0, input_ids.shape[1] :], skip_special_tokens=True))
memory = cache.memory()
print(
    f"{input_ids.shape[1]} prompt tokens; KV cache {memory['total_bytes'] / 1e6:.1f} MB "
    f"(retrieval {memory['retrieval_bytes'] / 1e6:.1f} MB + streaming {memory['streaming_bytes'] / 1e6:.1f} MB); "
    f"full attention would hold {memory['full_bytes'] / 1e6:.1f} MB"
)
