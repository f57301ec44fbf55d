"""OpenAI-compatible server + web chat page for an llmcore model.

    python scripts/serve.py out/sft                        # http://127.0.0.1:8000  (page at /)
    python scripts/serve.py out/hf --port 8080 --api-key sk-local --name minimind
    python scripts/serve.py --fake                         # no model: a scripted echo engine (demos)
Endpoints: POST /v1/chat/completions (stream=true for SSE), POST /v1/completions, GET /v1/models,
GET /health. Use any OpenAI client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_engine(args):
    from llmcore.serve.engine import FakeEngine, ModelEngine

    if args.fake:
        return FakeEngine(model_id=args.name or "fake", delay=0.02, max_seq_len=args.max_seq_len or 512)
    import torch

    from llmcore.export.loading import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device)
    if tok is None:
        sys.exit("no tokenizer found next to the model: pass --tokenizer DIR")
    name = args.name or Path(args.model).resolve().name
    return ModelEngine(model, tok, model_id=name, max_seq_len=args.max_seq_len)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="llmcore checkpoint / training output dir / transformers dir")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: found next to the model)")
    ap.add_argument("--fake", action="store_true", help="serve a scripted engine instead of a model")
    ap.add_argument("--name", help="model id clients send (default: the directory name)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, local only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--max-active", type=int, default=16, help="requests generating at once (others queue)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="context limit (default: the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args(argv)
    if not args.fake and not args.model:
        ap.error("give a model directory or --fake")
    import uvicorn

    from llmcore.serve.app import create_app

    engine = build_engine(args)
    app = create_app(engine, api_key=args.api_key, max_active=args.max_active)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"serving {engine.model_id!r} on http://{args.host}:{args.port} (chat page at /)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
