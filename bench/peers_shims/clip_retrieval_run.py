"""clip-retrieval (PyPI clip-retrieval 2.45.0) in process, for bench/peers.py: index is
``clip_inference`` (local, sequential: no Spark) then ``clip_index`` (autofaiss); query
is clip_back's ``KnnService.query``, what its HTTP endpoint /knn-service calls.

The shared checkpoint reaches it unchanged: all_clip's open_clip loader splits
``open_clip:ARCH/CHECKPOINT`` at the first slash and hands CHECKPOINT to
``open_clip.create_model_and_transforms(pretrained=...)``, which loads a local file.
"""

from __future__ import annotations

import json
import time

from common import emit, parse_args, pin, timed_queries

# xmodal's batch size, not clip-retrieval's 256: all_clip warms the model up on one batch
# of images and texts (twice) before encoding, which at 256 cost more than a few hundred
# photos themselves.
BATCH = 64


def main() -> None:
    args = parse_args()
    pin(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    clip_model = f"open_clip:ViT-B-32/{args.ckpt.resolve()}"
    emb, idx = args.work / "embeddings", args.work / "index"
    if args.phase == "index":
        from clip_retrieval.clip_index import clip_index
        from clip_retrieval.clip_inference.main import main as clip_inference

        t0 = time.perf_counter()
        clip_inference(
            input_dataset=str(args.folder),
            output_folder=str(emb),
            input_format="files",
            enable_text=False,
            enable_image=True,
            enable_metadata=False,
            batch_size=BATCH,
            num_prepro_workers=args.threads,
            clip_model=clip_model,
            use_jit=False,
            distribution_strategy="sequential",
            enable_wandb=False,
        )
        encoded = time.perf_counter()
        clip_index(str(emb), str(idx), nb_cores=args.threads)
        done = time.perf_counter()
        import faiss

        n = faiss.read_index(str(idx / "image.index")).ntotal
        emit(indexed=n, seconds=done - t0, encode_seconds=encoded - t0)
        return
    from clip_retrieval.clip_back import ClipOptions, KnnService, load_clip_indices

    paths = args.work / "indices_paths.json"
    paths.write_text(json.dumps({"bench": {"indice_folder": str(idx), "clip_model": clip_model}}))
    options = ClipOptions(
        indice_folder="",
        clip_model=clip_model,
        enable_hdf5=False,
        enable_faiss_memory_mapping=False,
        columns_to_return=["image_path"],
        reorder_metadata_by_ivf_index=False,
        enable_mclip_option=False,
        use_jit=False,
        use_arrow=False,
        provide_safety_model=False,
        provide_violence_detector=False,
        provide_aesthetic_embeddings=False,
    )
    service = KnnService(clip_resources=load_clip_indices(str(paths), options))
    queries = json.loads(args.queries.read_text())

    def run(q: str) -> list[str]:
        # deduplicate off: random weights put every photo within its 0.94 cosine of the
        # others, so it would return one or two of k (its cost is a search over the k).
        hits = service.query(
            text_input=q,
            modality="image",
            num_images=args.k,
            num_result_ids=args.k,
            deduplicate=False,
        )
        return [h.get("image_path", str(h["id"])) for h in hits]

    emit(**timed_queries(queries, run))


if __name__ == "__main__":
    main()
