"""Benchmark of the selection step (filters.py) with the embedded judge, on this CPU.

Prints:
1. the score distributions the default thresholds were chosen from (filters.py docstring):
   judge score, ROUGE-L and length ratio of LLM-style paraphrases, near-copies (one or two
   words changed) and unrelated same-genre texts, over 24 hand-written LaMP-style originals;
   and, as harder negatives, pairs of different profile inputs of one user of the demo data;
2. filter throughput: candidate pairs per second through `filters.select` with the
   EmbeddingJudge (all-MiniLM-L6-v2), 4 candidates per original (both SCF directions);
3. ROUGE speed: metrics.rouge_l / rouge_1 against rouge_score's RougeScorer (if installed).

The machines are 2 shared CPU cores: timings are noisy (other jobs run beside this one);
each timing is the best of `--repeats` runs.

    .venv/bin/python bench/bench_filters.py [--repeats 3] [--threads 2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import filters  # noqa: E402
import metrics  # noqa: E402

# (genre, original, paraphrase, near-copy)
SET = [
    ("tweet", "Just finished my first marathon and I can barely walk, but it was totally worth it!",
     "Completed my very first marathon today; my legs are wrecked but I'd do it again in a heartbeat.",
     "Just finished my first marathon and I can hardly walk, but it was totally worth it!"),
    ("tweet", "Why does the coffee machine at work always break on Mondays? Send help.",
     "Is it a law that the office coffee maker dies every Monday? Someone please rescue me.",
     "Why does the coffee machine at work always break on Mondays? Please help."),
    ("tweet", "Can't believe how fast my little sister is growing up. She starts college tomorrow.",
     "My baby sister heads off to college tomorrow and I have no idea where the years went.",
     "Can't believe how fast my little brother is growing up. He starts college tomorrow."),
    ("tweet", "Rain all weekend again, so it looks like another Netflix marathon for me.",
     "Another weekend of nonstop rain means I'm binge-watching shows on the couch once more.",
     "Rain all weekend again, so it looks like another movie marathon for me."),
    ("tweet", "Finally got my vaccine appointment. Grateful to all the nurses working so hard.",
     "My vaccination slot is booked at last, and I'm so thankful for the hardworking nurses.",
     "Finally got my vaccine appointment. Thankful to all the nurses working so hard."),
    ("title", "Efficient Fine-Tuning of Large Language Models with Low-Rank Adapters",
     "Parameter-Efficient Adaptation of Large Language Models via Low-Rank Updates",
     "Efficient Fine-Tuning of Large Language Models with Low-Rank Adaptation"),
    ("title", "A Graph Neural Network Approach to Traffic Forecasting in Urban Road Networks",
     "Predicting City Road Traffic Using Graph Neural Networks",
     "A Graph Neural Network Approach to Traffic Prediction in Urban Road Networks"),
    ("title", "Robust Speech Recognition in Noisy Environments Using Self-Supervised Pretraining",
     "Self-Supervised Pretraining for Noise-Robust Automatic Speech Recognition",
     "Robust Speech Recognition in Noisy Conditions Using Self-Supervised Pretraining"),
    ("title", "Privacy-Preserving Federated Learning for Medical Image Segmentation",
     "Federated Training of Medical Image Segmentation Models Without Sharing Patient Data",
     "Privacy-Preserving Federated Learning for Medical Image Classification"),
    ("title", "Measuring Gender Bias in Word Embeddings Across Languages",
     "A Cross-Lingual Study of Gender Bias in Word Vector Representations",
     "Measuring Gender Bias in Word Embeddings Across Many Languages"),
    ("abstract", "We propose a method that compresses neural networks by pruning redundant channels, "
     "reducing inference time by 40% with less than one point of accuracy loss on ImageNet.",
     "Our approach removes redundant channels from neural networks, which cuts inference latency "
     "by forty percent while costing under one point of ImageNet accuracy.",
     "We propose a method that compresses neural networks by pruning redundant filters, "
     "reducing inference time by 40% with less than one point of accuracy loss on ImageNet."),
    ("abstract", "This paper studies how students use online forums in introductory programming courses "
     "and finds that early participation predicts final exam performance.",
     "We examine forum usage by students in intro programming classes and show that those who post "
     "early tend to score higher on the final exam.",
     "This paper studies how students use online forums in introductory programming classes "
     "and finds that early participation predicts final exam performance."),
    ("abstract", "We introduce a new dataset of annotated satellite images for detecting illegal "
     "deforestation and benchmark several convolutional models on it.",
     "A collection of labeled satellite imagery for spotting illegal logging is presented, along "
     "with baseline results from several CNN architectures.",
     "We introduce a new dataset of labeled satellite images for detecting illegal "
     "deforestation and benchmark several convolutional models on it."),
    ("headline", "City council approves new budget with more funding for public transit",
     "Local lawmakers pass spending plan that boosts money for buses and trains",
     "City council approves new budget with extra funding for public transit"),
    ("headline", "Heat wave expected to break temperature records across the region this week",
     "Record-breaking temperatures forecast for the area as heat wave arrives",
     "Heat wave expected to break temperature records across the state this week"),
    ("headline", "Local bakery celebrates 100 years of serving the neighborhood",
     "Neighborhood bakery marks its centennial after a century in business",
     "Local bakery celebrates 100 years of serving the community"),
    ("headline", "Tech company announces layoffs affecting thousands of employees",
     "Thousands of workers to lose jobs as technology firm cuts staff",
     "Tech company announces layoffs affecting hundreds of employees"),
    ("headline", "Scientists discover new species of frog in remote rainforest",
     "Previously unknown frog species found deep in an isolated rainforest",
     "Scientists discover new species of lizard in remote rainforest"),
    ("review", "The battery lasts all day and the screen is bright, but the speakers are tinny and weak.",
     "Great all-day battery life and a vivid display, though the sound from the speakers is thin.",
     "The battery lasts all day and the screen is sharp, but the speakers are tinny and weak."),
    ("review", "Shipping took three weeks and the box arrived crushed. The blender itself works fine.",
     "Delivery was very slow and the package was damaged, yet the blender performs well enough.",
     "Shipping took two weeks and the box arrived crushed. The blender itself works fine."),
    ("review", "Comfortable shoes, true to size, and they still look new after months of daily walking.",
     "These shoes fit as expected, feel great, and have held up perfectly through months of walks.",
     "Comfortable shoes, true to size, and they still look great after months of daily walking."),
    ("plot", "A retired detective is pulled back into one last case when his former partner disappears.",
     "When his old partner vanishes, a detective who had left the force takes on a final investigation.",
     "A retired detective is drawn back into one last case when his former partner disappears."),
    ("plot", "Two strangers stranded at an airport during a snowstorm slowly fall in love.",
     "Snowed in at an airport, a pair of strangers gradually develop feelings for each other.",
     "Two strangers stuck at an airport during a snowstorm slowly fall in love."),
    ("plot", "A young wizard discovers that the school he attends hides a dangerous secret.",
     "A boy learning magic finds out his academy is concealing something perilous.",
     "A young witch discovers that the school she attends hides a dangerous secret."),
]


def unrelated(i: int) -> str:
    """Another original of the same genre (the hard negative for the judge)."""
    same = [j for j, row in enumerate(SET) if row[0] == SET[i][0] and j != i]
    return SET[same[0] if same[0] > i else same[-1]][1] if same else SET[(i + 1) % len(SET)][1]


def summary(values: list[float]) -> str:
    p5, p95 = (statistics.quantiles(values, n=20)[i] for i in (0, 18))
    return (f"min {min(values):.2f}  p5 {p5:.2f}  median {statistics.median(values):.2f}  p95 {p95:.2f}  "
            f"max {max(values):.2f}  (n={len(values)})")


def demo_negatives(judge, per_user: int = 12, cap: int = 300):
    """Two different profile inputs of the same demo user, instruction template cut
    (as cdcda.upload does): topically close texts that are NOT paraphrases of each other."""
    import itertools

    import cdcda
    import data
    for name in ("lamp1", "lamp2", "lamp3", "lamp4", "lamp7"):  # lamp5 has lamp1's inputs
        task = data.get_task(name)
        a, b = [], []
        for user in data.load_users(name):
            xs = [x for x, _ in cdcda.upload(task, user)[:per_user]]
            for x, y in itertools.combinations(xs, 2):
                a.append(x)
                b.append(y)
        a, b = a[:cap], b[:cap]
        cos = judge(a, b)
        share = sum(c >= filters.EPS_SCF_EMBEDDING for c in cos) / len(cos)
        rouge = [metrics.rouge_l(y, x) for x, y in zip(a, b)]
        print(f"  {name} cosine  {summary(cos)}  share >= eps_scf {share:.1%}\n  {'':<5} ROUGE-L {summary(rouge)}")


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timings report the best of this many runs")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    judge = filters.EmbeddingJudge()
    print(f"judge: {judge.name}, loaded in {time.perf_counter() - t:.2f} s; torch threads {args.threads}")

    print("\n1. score distributions behind the default thresholds")
    kinds = {"paraphrase": [row[2] for row in SET], "near-copy": [row[3] for row in SET],
             "unrelated": [unrelated(i) for i in range(len(SET))]}
    originals = [row[1] for row in SET]
    for kind, others in kinds.items():
        cos = judge(originals, others)
        rouge = [filters.token_diversity(x, o, 1.0)[1] for x, o in zip(originals, others)]
        ratio = [filters.length_ratio(x, o, 0, 1e9)[1] for x, o in zip(originals, others)]
        share = sum(c >= filters.EPS_SCF_EMBEDDING for c in cos) / len(cos)
        print(f"  {kind:<10}  cosine  {summary(cos)}  share >= eps_scf {share:.1%}\n"
              f"  {'':<10}  ROUGE-L {summary(rouge)}\n  {'':<10}  length  {summary(ratio)}")
    print("  demo data, same user, different profile inputs (the hard negatives):")
    demo_negatives(judge)
    print(f"  defaults: eps_scf(embedding)={filters.EPS_SCF_EMBEDDING} eps_scf(nli)={filters.EPS_SCF_NLI} "
          f"eps_tdf={filters.EPS_TDF} len in [{filters.EPS_MIN_LEN}, {filters.EPS_MAX_LEN}]")

    print("\n2. filter throughput (filters.select, EmbeddingJudge)")
    pairs = [((row[1], "y"), (cand, "y_syn")) for i, row in enumerate(SET)
             for cand in (row[2], row[3], unrelated(i), row[2] + " " + row[2])]  # 4 candidates each
    origs, cands = [p[0] for p in pairs], [p[1] for p in pairs]
    sel = filters.select(origs, cands, judge)
    print(f"  counts on the {len(cands)} candidates: {sel.counts}")
    # a fresh list of texts per repeat would be the same work: the judge embeds unique texts once per call
    seconds = best_of(args.repeats, lambda: filters.select(origs, cands, judge))
    print(f"  {len(cands)} candidate pairs in {seconds:.3f} s: {len(cands) / seconds:.1f} pairs/s")
    no_judge = best_of(args.repeats, lambda: [(filters.token_diversity(x, s, 0.7), filters.length_ratio(x, s, 0.5, 2))
                                              for (x, _), (s, _) in zip(origs, cands)])
    print(f"  of which TDF + LSF alone: {no_judge * 1e3:.2f} ms ({len(cands) / no_judge:.0f} pairs/s)")

    print("\n3. ROUGE speed, ours vs rouge_score")
    texts = [(o, c) for (o, _), (c, _) in zip(origs, cands)] * 10
    ours = best_of(args.repeats, lambda: [(metrics.rouge_1(p, r), metrics.rouge_l(p, r)) for r, p in texts])
    print(f"  metrics.rouge_1 + rouge_l: {len(texts) / ours:.0f} pairs/s")
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        print("  rouge_score not installed: no comparison")
        return
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    theirs = best_of(args.repeats, lambda: [scorer.score(r, p) for r, p in texts])
    print(f"  rouge_score RougeScorer:   {len(texts) / theirs:.0f} pairs/s  (ours is {theirs / ours:.2f}x its speed)")


if __name__ == "__main__":
    main()
