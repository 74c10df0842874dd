"""How fast the example store and selection are, on wikigold sentences as stored corrections.

Prints, for growing example sets: writes per second (one webhook = one upsert transaction), the
cold index build (first /predict after the set changed, per worker), warm selection per task, and
the index's memory. Run: .venv/bin/python benchmarks/example_selection.py [path/to/wikigold.conll.txt]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.infra.storage import Database  # noqa: E402
from backend.learning.selection import ExampleIndex  # noqa: E402
from backend.learning.store import ExampleStore  # noqa: E402
from backend.ner.labelconfig import parse_label_config  # noqa: E402
from backend.spans.alignment import Span  # noqa: E402
from backend.tools.conll import build_units, read_conll  # noqa: E402

WIKIGOLD = REPO / "tests" / "data" / "wikigold" / "wikigold.conll.txt"
CONFIG = """<View><Labels name="label" toName="text"><Label value="PER"/><Label value="ORG"/><Label value="LOC"/>
<Label value="MISC"/></Labels><Text name="text" value="$text"/></View>"""


def main(path: Path) -> None:
    units = build_units(read_conll(path), per="sentence")
    target = parse_label_config(CONFIG).targets[0]
    queries = [u.text for u in units[-200:]]
    print(f"wikigold: {len(units)} sentences; queries: the last {len(queries)}")
    print(f"{'examples':>8} {'writes/s':>9} {'cold index ms':>13} {'select ms (mean/p95)':>21} {'index MB':>9}")
    for size in (100, 500, 1000, len(units) - len(queries)):
        with tempfile.TemporaryDirectory() as tmp:
            store = ExampleStore(Database.in_dir(Path(tmp)), "1")
            started = time.perf_counter()
            for i, unit in enumerate(units[:size]):
                spans = [Span(e.start, e.end, e.text, e.label) for e in unit.entities]
                store.upsert_annotation(i + 1, i + 1, float(i), {"label": (unit.text, spans)})
            writes = size / (time.perf_counter() - started)

            started = time.perf_counter()
            select = store.selector(k=4, token_budget=1500)
            cold_ms = (time.perf_counter() - started) * 1000

            timings = []
            for text in queries:
                started = time.perf_counter()
                select(target, text)
                timings.append((time.perf_counter() - started) * 1000)
            p95 = statistics.quantiles(timings, n=20)[-1]

            tracemalloc.start()
            index = ExampleIndex([e.few_shot() for e in store.examples()])
            size_mb = tracemalloc.get_traced_memory()[0] / 1e6
            tracemalloc.stop()
            del index
            print(f"{size:>8} {writes:>9.0f} {cold_ms:>13.1f} {statistics.mean(timings):>10.2f} / {p95:>8.2f} {size_mb:>9.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else WIKIGOLD)
