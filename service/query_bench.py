"""`voxarc bench-query`: C-FIND / QIDO matching on a synthetic index of a given size.

An administrator sizing an index (SQLite or PostgreSQL) and a developer changing
:mod:`storage.query` both want to know what the queries viewers send cost at scale. The command
fills a fresh index with patients, studies, series and instances whose attributes vary as an
archive's do, then times each query of a fixed set (median of ``--runs``) and prints a table.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from service.progress import Progress
from storage import query
from storage.index import Index, Instance, Patient, Series, Study

MODALITIES = ("CT", "MR", "CR", "US", "PT", "SR")
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"

# name -> (level, criteria); keys of the attributes a worklist or a viewer asks for come empty
QUERIES = {
    "worklist (study dates, modalities, counts)": ("STUDY", {
        "StudyDate": "20240301-20240307", "PatientName": "", "PatientID": "",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": "", "StudyDescription": ""}),
    "patients by name": ("PATIENT", {"PatientName": "SMITH*", "PatientID": "",
                                     "NumberOfPatientRelatedStudies": ""}),
    "series of one study": ("SERIES", {"StudyInstanceUID": "{study}", "Modality": "",
                                       "SeriesNumber": "", "NumberOfSeriesRelatedInstances": ""}),
    "instances of one series": ("IMAGE", {"StudyInstanceUID": "{study}",
                                          "SeriesInstanceUID": "{series}", "InstanceNumber": "",
                                          "SOPClassUID": ""}),
    "MR series of a week, no study key": ("SERIES", {"Modality": "MR",
                                                     "SeriesDate": "20240301-20240307"}),
    "series by description, no study key": ("SERIES", {"SeriesDescription": "*DIFFUSION*"}),
    "one instance by UID, no higher keys": ("IMAGE", {"SOPInstanceUID": "{sop}"}),
}


def fill(index: Index, studies: int, series_per_study: int, per_series: int,
         seed: int = 0, progress: Progress | None = None) -> dict:
    """Fill ``index`` with synthetic rows; return sample UIDs for the queries' placeholders."""
    rng = random.Random(seed)
    patients = max(1, studies // 2)
    names = ["SMITH", "JONES", "MÜLLER", "GARCIA", "NGUYEN", "DOE", "ROSSI", "KOWALSKI"]
    with index.engine.begin() as conn:
        conn.execute(insert(Patient), [
            {"id": p + 1, "patient_id": f"PID{p:07d}", "patient_name":
             f"{rng.choice(names)}^{rng.choice(names).title()}{p}", "birth_date": "19700101",
             "sex": rng.choice("FM")} for p in range(patients)])
    instance_id = 0
    for s0 in range(0, studies, 100):
        study_rows, series_rows, instance_rows = [], [], []
        for st in range(s0, min(studies, s0 + 100)):
            day = 20240101 + 100 * rng.randint(0, 5) + rng.randint(0, 27)
            study_rows.append({"id": st + 1, "study_uid": f"1.2.826.0.1.99.{st}",
                               "patient_fk": rng.randint(1, patients), "study_date": str(day),
                               "study_time": "101500", "accession_number": f"ACC{st}",
                               "study_description": rng.choice(["CHEST", "HEAD", "KNEE"])})
            for r in range(series_per_study):
                sid = st * series_per_study + r + 1
                modality = rng.choice(MODALITIES)
                series_rows.append({"id": sid, "series_uid": f"1.2.826.0.1.99.{st}.{r}",
                                    "study_fk": st + 1, "modality": modality,
                                    "series_number": str(r + 1), "series_date": str(day),
                                    "series_description": rng.choice(
                                        ["AX 5mm", "DIFFUSION b1000", "T1 SAG", "LOCALIZER"])})
                for i in range(per_series):
                    instance_id += 1
                    instance_rows.append({
                        "id": instance_id, "sop_uid": f"1.2.826.0.1.99.{st}.{r}.{i}",
                        "series_fk": sid, "sop_class_uid": MR if modality == "MR" else CT,
                        "transfer_syntax": "1.2.840.10008.1.2.1", "instance_number": i + 1,
                        "size": 526000, "sha256": "0" * 64, "received_at": 0.0,
                        "staged_key": None})
        with index.engine.begin() as conn:
            conn.execute(insert(Study), study_rows)
            conn.execute(insert(Series), series_rows)
            conn.execute(insert(Instance), instance_rows)
        if progress:
            progress.advance(min(studies, s0 + 100) - s0)
    middle = studies // 2
    return {"study": f"1.2.826.0.1.99.{middle}", "series": f"1.2.826.0.1.99.{middle}.0",
            "sop": f"1.2.826.0.1.99.{middle}.0.{per_series // 2}"}


def run_queries(index: Index, samples: dict, runs: int) -> list[dict]:
    """Time each query of :data:`QUERIES` ``runs`` times; one result dict per query."""
    out = []
    for name, (level, criteria) in QUERIES.items():
        keys = {k: v.format(**samples) for k, v in criteria.items()}
        times, count = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            count = len(query.find(index, level, keys))
            times.append(time.perf_counter() - t0)
        out.append({"query": name, "level": level, "results": count,
                    "median_ms": 1000 * statistics.median(times),
                    "runs_ms": [round(1000 * t, 1) for t in times]})
    return out


def _table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| query | level | results | median ms |", "|---|---|---:|---:|"]
    lines += [f"| {r['query']} | {r['level']} | {r['results']} | {r['median_ms']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def _cmd(args) -> int:
    with tempfile.TemporaryDirectory(prefix="voxarc-query-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(args.keep or tmp) / 'index.sqlite'}"
        index = Index(url)
        try:
            if args.database_url and index.engine.dialect.name != "sqlite":
                with index.read() as s:
                    if s.query(Instance.id).limit(1).first() is not None:
                        print("bench-query: that database already holds an index; "
                              "give it an empty one")
                        return 2
            total = args.studies * args.series_per_study * args.instances_per_series
            progress = Progress("fill (studies)", args.studies)
            t0 = time.perf_counter()
            samples = fill(index, args.studies, args.series_per_study,
                           args.instances_per_series, progress=progress)
            progress.finish()
            print(f"filled {args.studies} studies, {args.studies * args.series_per_study} "
                  f"series, {total} instances in {time.perf_counter() - t0:.1f} s "
                  f"({index.engine.dialect.name})")
            rows = run_queries(index, samples, args.runs)
        finally:
            index.engine.dispose()
    print(_table(rows, f"median of {args.runs} runs"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-query", help="time C-FIND/QIDO matching on a synthetic "
                                                  "index of a given size")
    p.add_argument("--studies", type=int, default=2500)
    p.add_argument("--series-per-study", type=int, default=4)
    p.add_argument("--instances-per-series", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--database-url", default="", help="an empty database to fill (default: a "
                                                      "temporary SQLite file)")
    p.add_argument("--keep", help="an empty folder to write the SQLite index into and keep")
    p.add_argument("--json", help="write the results here too")
    p.set_defaults(func=_cmd)
