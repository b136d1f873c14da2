"""`make mutate`: mutation testing of the core with mutmut (configured in pyproject.toml's
[tool.mutmut]), then a killed/survived score per module.

mutmut mutates every function of the files in only_mutate; this script runs the mutants of
the modules below only, and of infer, stages/lib/model.py and the report only the functions
named (infer's per-image scoring with model's full_size_probs, the report's comparison
tables), with one worker (`--max-children 1`: the machine's cores are shared). Not mutated
(pyproject.toml's do_not_mutate_patterns): log calls and argparse help texts, which are not
output contracts.

A mutant judged equivalent (no test can tell it from the original) is listed in EQUIVALENT
by its function and mutated line, with the reason, and left out of the score's denominator
(the script fails when a listed mutant no longer exists or a test killed it).

Usage: python -m benchmarks.mutate [--no-run] [--module M]... [--mutant NAME]...
       [--markdown FILE]
"""
from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from stages.lib.cli import first_sentence

ROOT = Path(__file__).resolve().parents[1]

# module -> mutant-name patterns (mutmut's names: <module>.x_<function>__mutmut_<n>)
MODULES = {
    "stages/lib/metrics.py": ["stages.lib.metrics.*"],
    "stages/lib/buckets.py": ["stages.lib.buckets.*"],
    "stages/lib/labels.py": ["stages.lib.labels.*"],
    "stages/lib/fetch.py": ["stages.lib.fetch.*"],
    "stages/evaluate.py": ["stages.evaluate.*"],
    "stages/compare.py": ["stages.compare.*"],
    "stages/infer.py (scoring)": ["stages.infer.x_sample_scores__mutmut_*",
                                  "stages.infer.x_image_miou__mutmut_*"],
    "stages/lib/model.py (full_size_probs)": ["stages.lib.model.x_full_size_probs__mutmut_*"],
    "stages/report/tables.py (comparison tables)": [
        "stages.report.tables.x_comparison_row__mutmut_*",
        "stages.report.tables.x_comparison_table__mutmut_*",
        "stages.report.tables.x_verdict__mutmut_*", "stages.report.tables.x_verdicts__mutmut_*"],
}

# mutant name -> why no test can kill it (behaviour identical on every input it can get)
_CPU_ONLY = ("log_probs and gt both live on the CPU on every machine here (no accelerator), so "
             "gt.to(...) with another device argument or none is the same tensor")
_ASTYPE_NONE = ("astype(None) is astype(float): numpy's default dtype is float64, and "
                "pandas' too")
_ERRSTATE = ("_ratio divides by np.maximum(den, 1) >= 1, so no division in it can warn: the "
             "errstate around it (a guard) changes nothing")
_ALIGN = ("align_corners None or left out is F.interpolate's default, False, without a warning "
          "(torch 2.14)")
_NAN = 'float("NAN") is float("nan") (case-insensitive)'
_MODE_P = "a 2-D uint8 array becomes an L image, and putpalette turns L into P"
_UINT8 = "a P or L image (the only modes let through) is already uint8"
_CLIP = ("searchsorted over edges[1:-1] already returns 0..len(edges) - 2: the clip's bounds "
         "never bind")
_EXCESS = ("se is NaN, 0 or positive and finite; for each the mutated condition picks the "
           "same branch (NaN / NaN is NaN too)")
_ASARRAY = ("the values reaching assign are float, int or bool columns (compare passes "
            "pd.to_numeric's floats), which isnan and searchsorted take as they are")
_GUARD = ("the guard only spells out pandas' own result: the sample sd of one loss and the mean "
          "of none are NaN, and NaN / sqrt(n) is NaN")
_NON_BLOCKING = "non_blocking is a copy-scheduling hint: the tensor's values are the same"
_STR_PATH = ("the option's value reaches only stages.lib.names.inside() and open() (both take "
             "a str or a Path) and f-strings (the same text): str and Path behave alike")
_AXIS_2D = "the array summed is 2-D (images, classes): axis +1 is axis -1"
_NO_WARNING = ("found / np.maximum(total, 1) divides finite counts by at least 1: nothing in "
               "the errstate (a guard) can warn")
_ONLY_RUNTIME = ("the guarded calls (np.nanmean of an all-NaN slice, np.percentile) can only "
                 "raise RuntimeWarning: ignoring every category ignores the same warnings")
_REQUEST_HEADER_CASE = ("urllib.request.Request stores a header under key.capitalize(), so "
                        "any spelling of its name is sent as the same header")
_PART_READ = ("a CorruptFile comes from _verify, which has just read the .part: it exists, "
              "so missing_ok is never consulted")
_FLAGGED_IDS = ("the flagged ids left as read (checked by _image_ids, not cast) reach only "
                "joined_samples' isin against samples.csv's int ids: pandas reads a column of "
                "whole numbers as int or float, and a float id equals and hashes as its int "
                "(101.0 == 101), so the same images are flagged")
_MERGE_ON = ("the two frames share the image_id column only (every other column carries its "
             "scheme's name), so merging on the common columns is merging on image_id")
_INNER = "how='inner' is DataFrame.merge's default"
_LEFT_INNER = ("joined's images are a subset of every scheme's samples (joined is made from "
               "them, one row each), so an inner merge keeps the same rows in the same (left) "
               "order as a left one")
_DELTA_INDEX = ("each delta is a Series on merged's index, and a DataFrame of Series takes "
                "their index: the explicit index is the same one")
_LAST_EDGE = ("buckets.assign reads only the inner edges (edges[1:-1]) and the count of "
              "edges: the last edge's value is never read")
_KEEP_FIRST = "keep='first' is drop_duplicates' default"
_HEADER_CASE = "HTTP header names are case-insensitive (email.message.Message's get)"
_LOCAL_BOUND = ("a local source is refused unless a regular file within the bound by its size "
                "(fstat, before the copy), so the copy never reaches the cut-off that `end` "
                "and `bound` serve (only a file growing while it is copied would)")
_REDIRECT = ("urllib's redirect_request reads fp, msg and headers only to raise an HTTPError "
             "for a redirect it will not follow (a POST's 307, say): fetch sends only GETs, "
             "and http_error_30x passes only 301, 302, 303, 307, 308")
_COMPARE_GUARD = ("the guard only spells out pandas' own result, without a warning: the "
                  "mean of no delta and the sample sd of one are NaN, and NaN / sqrt(n) is NaN "
                  "(for n = 0 too)")
_COLUMNS = ("the tables reaching it always have their columns (cluster_changes and "
            "bucket_changes build them with CHANGE_COLUMNS even when empty), and a filter of "
            "an empty table with its columns is empty: the guard changes nothing")
_RECORDS = "pandas lower-cases to_dict's orient (pandas 3.1)"
_MULTI_KIND = ("pandas applies `kind` only to a sort on a single column; on two columns it "
               "uses its own stable lexsort whatever `kind` says")
_INT64 = ("numpy 2's default integer is int64 on every platform, and these lists are "
          "never empty (seeds: train.seeds has at least one; images: evaluate refuses an "
          "empty ground-truth folder; categories: the scheme's classes resolve against "
          "them, so there is at least one)")
_INT64_SUM = ("the matrices are int64 already (confusion_matrix's), and numpy sums integers "
              "in at least int64 anyway")
_EMPTY_Q = ("pandas 3.1 makes a Series of None, or of no data, over an index a float64 "
            "column of NaN: the same as np.nan's")
_CLASSES = ("compare writes summary.json's bootstrap block and every pair's classes together "
            "(both from --metrics), and verdicts reads the pairs only when bootstrap's "
            "confidence is there: a pair without classes never reaches the default")
_EMPTY_INSTANCE = ("an instance of no pixel owns none, and image_categories counts only "
                   "instances that own a pixel: the same counts")
# (function, its mutated line(s) as mutated_lines gives them) -> why no test can kill it:
# keyed by what the mutant is, not by mutmut's number for it
EQUIVALENT: dict[tuple[str, str], str] = {
    ("stages.lib.model.x_full_size_probs", 'resized = F.interpolate(logits[None].float(), '
     'size=size, mode="bilinear", align_corners=None)'): _ALIGN,
    ("stages.lib.model.x_full_size_probs", 'resized = F.interpolate(logits[None].float(), '
     'size=size, mode="bilinear", )'): _ALIGN,
    ("stages.infer.x_sample_scores",
     "target = gt.to(None, non_blocking=True)[None].long()"): _CPU_ONLY,
    ("stages.infer.x_sample_scores",
     "target = gt.to(non_blocking=True)[None].long()"): _CPU_ONLY,
    ("stages.infer.x_sample_scores",
     "target = gt.to(log_probs.device, )[None].long()"): _NON_BLOCKING,
    ("stages.infer.x_sample_scores",
     "target = gt.to(log_probs.device, non_blocking=False)[None].long()"): _NON_BLOCKING,
    ("stages.infer.x_sample_scores",
     '"loss": float(nll) / n_valid if n_valid else float("NAN"),'): _NAN,
    ("stages.infer.x_image_miou",
     'return float(defined.mean()) if len(defined) else float("NAN")'): _NAN,
    ("stages.infer.x_sample_scores", '"pixel_accuracy": float(np.trace(cm) / n_valid) if '
     'n_valid else float("NAN"),'): _NAN,
    ("stages.report.tables.x_verdicts",
     'for name, entry in p.get("classes", None).items()]'): _CLASSES,
    ("stages.report.tables.x_verdicts", 'for name, entry in p.get("classes", ).items()]'): (
        _CLASSES),
    ("stages.report.tables.x_comparison_row", '"pos" if row["delta"] >= 0 else "neg")'): (
        "reached only when |delta| >= SAME, so delta is never 0 there"),
    ("stages.lib.buckets.x_assign", "index = np.clip(np.searchsorted(edges[1:-1], v, "
     'side="right"), 0, len(edges) + 2)'): _CLIP,
    ("stages.lib.buckets.x_assign", "index = np.clip(np.searchsorted(edges[1:-1], v, "
     'side="right"), None, len(edges) - 2)'): _CLIP,
    ("stages.lib.buckets.x_assign", "index = np.clip(np.searchsorted(edges[1:-1], v, "
     'side="right"), 0, None)'): _CLIP,
    ("stages.lib.buckets.x_assign", "v = np.asarray(values, dtype=None)"): _ASARRAY,
    ("stages.lib.buckets.x_assign", "v = np.asarray(values, )"): _ASARRAY,
    ("stages.lib.buckets.x_bucket_table", "std = float(losses.std(ddof=1)) if (len(losses) >= "
     "2) or True else np.nan"): _GUARD,
    ("stages.lib.buckets.x_bucket_table", "se = std / np.sqrt(len(losses)) if (len(losses) >= "
     "2) or True else np.nan"): _GUARD,
    ("stages.lib.buckets.x_bucket_table", "mean = float(losses.mean()) if (len(losses)) or True "
     "else np.nan"): _GUARD,
    ("stages.lib.buckets.x_bin_edges",
     "v = values.astype(None).dropna().to_numpy()"): _ASTYPE_NONE,
    ("stages.lib.buckets.x_bucket_table", 'loss = samples["loss"].astype(None)'): _ASTYPE_NONE,
    ("stages.lib.buckets.x_bucket_table",
     'losses = members["loss"].astype(None).dropna()'): _ASTYPE_NONE,
    ("stages.lib.buckets.x_bin_edges", "edges = np.concatenate([[low], inner, inner[-2:] if "
     "len(inner) == 1 else []])"): "inner[-2:] is inner[-1:] when inner has one element",
    ("stages.lib.buckets.x_bucket_table", "excess = (mean - overall) / se if se and "
     "np.isfinite(se) or se > 0 else np.nan"): _EXCESS,
    ("stages.lib.buckets.x_bucket_table", "excess = (mean - overall) / se if se or "
     "np.isfinite(se) and se > 0 else np.nan"): _EXCESS,
    ("stages.lib.buckets.x_bucket_table", "excess = (mean - overall) / se if se and "
     "np.isfinite(se) and se >= 0 else np.nan"): _EXCESS,
    ("stages.lib.buckets.x_bucket_table", 'row.update({f"mean_{c}": members[c].mean() if (n) '
     "or True else np.nan for c in iou_cols})"): (
        "the mean of an empty column is NaN in pandas too, without a warning"),
    ("stages.lib.buckets.x_is_two_valued", "return pd.api.types.is_bool_dtype(None) or "
     "set(values.dropna().unique()) <= {0, 1}"): (
        "a boolean column's values are a subset of {0, 1} (True == 1), so the second test "
        "says yes for it too"),
    ("stages.lib.buckets.x_flag_by_fdr", "q = pd.Series(None, index=p_values.index)"): _EMPTY_Q,
    ("stages.lib.buckets.x_flag_by_fdr", "q = pd.Series(index=p_values.index)"): _EMPTY_Q,
    ("stages.lib.buckets.x_flag_by_fdr", "q[tested] = stats.false_discovery_control("
     "p_values[tested].to_numpy(float), )"): (
        "method='bh' is false_discovery_control's default"),
    ("stages.lib.buckets.x_flag_by_fdr", "q[tested] = stats.false_discovery_control("
     'p_values[tested].to_numpy(float), method="BH")'): (
        "false_discovery_control lower-cases `method` (scipy 1.17): BH is bh"),
    ("stages.lib.buckets.x_higher_p_value", 'return float(stats.mannwhitneyu(group, rest, '
     'alternative="GREATER").pvalue)'): (
        "scipy's mannwhitneyu lower-cases `alternative` (scipy 1.17): GREATER is greater"),
    ("stages.lib.metrics.x__ratio",
     'with np.errstate(invalid=None, divide="ignore"):'): _ERRSTATE,
    ("stages.lib.metrics.x__ratio",
     'with np.errstate(invalid="ignore", divide=None):'): _ERRSTATE,
    ("stages.lib.metrics.x__ratio", 'with np.errstate(divide="ignore"):'): _ERRSTATE,
    ("stages.lib.metrics.x__ratio", 'with np.errstate(invalid="ignore", ):'): _ERRSTATE,
    ("stages.lib.metrics.x_per_class_iou",
     "tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores", "tp = np.diag(cm).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores", "gt_count = cm.sum(1).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores", "pred_count = cm.sum(0).astype(None)"): _ASTYPE_NONE,
    ("stages.lib.metrics.x_scores",
     "freq = gt_count / total if total else np.zeros_like(None)"): (
        "freq's value when total is 0 is never read: fw_iou is NaN then"),
    ("stages.lib.labels.x_label_image", "image = Image.fromarray(labels, mode=None)"): _MODE_P,
    ("stages.lib.labels.x_label_image", "image = Image.fromarray(labels, )"): _MODE_P,
    ("stages.lib.labels.x_read_labels",
     "return np.asarray(image, dtype=None).copy()"): _UINT8,
    ("stages.lib.labels.x_read_labels", "return np.asarray(image, ).copy()"): _UINT8,
    ("stages.lib.labels.x_save_labels", 'label_image(labels).save(tmp, format="PNG", '
     'compress_level=compress_level)'): "optimize left out: False is Pillow's PNG default",
    ("stages.lib.labels.x_save_labels", 'label_image(labels).save(tmp, format="png", '
     'optimize=False, compress_level=compress_level)'): "Pillow upper-cases format names",
    # compare (measured on main 38ae560)
    ("stages.compare.x_main",
     'parser.add_argument("--analysis", required=True, type=None,'): _STR_PATH,
    ("stages.compare.x_main", 'parser.add_argument("--metrics", type=None,'): _STR_PATH,
    ("stages.compare.x_difference", 'warnings.simplefilter("ignore", )'): _ONLY_RUNTIME,
    ("stages.compare.x_differences", "per_image = {s: read_per_image(inside(metrics, "
     'f"{s}.per_image.npz", resolve=None),'): (
        "inside() tests `if resolve`: None is false, as False is"),
    ("stages.compare.x_found_share",
     'with np.errstate(invalid=None, divide="ignore"):'): _NO_WARNING,
    ("stages.compare.x_found_share",
     'with np.errstate(invalid="ignore", divide=None):'): _NO_WARNING,
    ("stages.compare.x_found_share", 'with np.errstate(divide="ignore"):'): _NO_WARNING,
    ("stages.compare.x_found_share", 'with np.errstate(invalid="ignore", ):'): _NO_WARNING,
    ("stages.compare.x__images_showing_class", "shown = (a.confusion[:, 0, i, :].sum(+1) > 0) "
     "| (b.confusion[:, 0, j, :].sum(-1) > 0)"): _AXIS_2D,
    ("stages.compare.x__images_showing_class", "shown = (a.confusion[:, 0, i, :].sum(-1) > 0) "
     "| (b.confusion[:, 0, j, :].sum(+1) > 0)"): _AXIS_2D,
    ("stages.compare.x_scheme_differences", "shown = per_image[a].category_pixels[:, 0, c]"
     ".sum(+1) > 0   # ground truth: any seed"): _AXIS_2D,
    ("stages.compare.x_joined_samples", "merged = part if merged is None else "
     'merged.merge(part, on=None, how="inner",'): _MERGE_ON,
    ("stages.compare.x_joined_samples", "merged = part if merged is None else "
     'merged.merge(part, how="inner",'): _MERGE_ON,
    ("stages.compare.x_joined_samples", "merged = part if merged is None else "
     'merged.merge(part, on="image_id", validate="one_to_one")'): _INNER,
    ("stages.compare.x_joined_samples",
     "return pd.concat([merged, pd.DataFrame(deltas, index=None)], axis=1)"): _DELTA_INDEX,
    ("stages.compare.x_joined_samples",
     "return pd.concat([merged, pd.DataFrame(deltas, )], axis=1)"): _DELTA_INDEX,
    ("stages.compare.x_bucket_changes", "for (binning, field), part in bins[grouping]"
     '.groupby(["binning", "field"], sort=None):'): (
        "pandas' groupby tests `if sort`: None is false, as False is (groups in order of "
        "appearance)"),
    ("stages.compare.x_read_scheme",
     'issues["XXimage_idXX"] = _image_ids(issues["image_id"], folder / "label_issues.csv")'):
        _FLAGGED_IDS,
    ("stages.compare.x_read_scheme",
     'issues["IMAGE_ID"] = _image_ids(issues["image_id"], folder / "label_issues.csv")'):
        _FLAGGED_IDS,
    ("stages.compare.x_run", "folder = inside(analysis, name, resolve=None)"): (
        "inside() tests `if resolve`: None is false, as False is"),
    ("stages.compare.x_bucket_changes",
     'values = joined[["image_id"]].merge(samples[grouping], on=None, how="left")'): _MERGE_ON,
    ("stages.compare.x_bucket_changes",
     'values = joined[["image_id"]].merge(samples[grouping], how="left")'): _MERGE_ON,
    ("stages.compare.x_bucket_changes",
     'values = joined[["image_id"]].merge(samples[grouping], on="image_id", )'): _LEFT_INNER,
    ("stages.compare.x_bucket_changes",
     'edges = np.append(part["low"].to_numpy(), None)'): _LAST_EDGE,
    ("stages.compare.x_bucket_changes",
     'edges = np.append(part["low"].to_numpy(), part["high"].to_numpy()[+1])'): _LAST_EDGE,
    ("stages.compare.x_bucket_changes",
     'edges = np.append(part["low"].to_numpy(), part["high"].to_numpy()[-2])'): _LAST_EDGE,
    ("stages.compare.x_bucket_changes",
     "return _ranked(_flagged(frame.drop_duplicates(subset=same, ), fdr))"): _KEEP_FIRST,
    ("stages.compare.x_summary",
     '.head(N_TOP).to_dict("records") if (len(frame)) or True else [])'): _COLUMNS,
    ("stages.compare.x_summary",
     '.head(N_TOP).to_dict("RECORDS") if len(frame) else [])'): _RECORDS,
    ("stages.compare.x__ranked",
     "ascending=[True, True, False, False], kind=None)"): _MULTI_KIND,
    ("stages.compare.x__ranked", "ascending=[True, True, False, False], )"): _MULTI_KIND,
    ("stages.compare.x__ranked",
     'ascending=[True, True, False, False], kind="XXstableXX")'): _MULTI_KIND,
    ("stages.compare.x__ranked",
     'ascending=[True, True, False, False], kind="STABLE")'): _MULTI_KIND,
    ("stages.compare.x_group_change",
     "mean = float(d.mean()) if (n) or True else np.nan"): _COMPARE_GUARD,
    ("stages.compare.x_group_change",
     "se = float(d.std(ddof=1) / np.sqrt(n)) if (n >= 2) or True else np.nan"): _COMPARE_GUARD,
    ("stages.compare.x_issue_changes", "kind=None).reset_index(drop=True)"): _MULTI_KIND,
    ("stages.compare.x_issue_changes", ").reset_index(drop=True)"): _MULTI_KIND,
    ("stages.compare.x_issue_changes", 'kind="XXstableXX").reset_index(drop=True)'): _MULTI_KIND,
    ("stages.compare.x_issue_changes", 'kind="STABLE").reset_index(drop=True)'): _MULTI_KIND,
    # fetch
    ("stages.lib.fetch.x__complete_already",
     'match = _UNSATISFIED_RANGE.fullmatch((exc.headers.get("content-range") or "").strip())'):
        _HEADER_CASE,
    ("stages.lib.fetch.x__complete_already",
     'match = _UNSATISFIED_RANGE.fullmatch((exc.headers.get("CONTENT-RANGE") or "").strip())'):
        _HEADER_CASE,
    ("stages.lib.fetch.x__complete_already",
     'match = _UNSATISFIED_RANGE.fullmatch((exc.headers.get("Content-Range") or "XXXX").strip())'):
        "with no Content-Range, 'XXXX' does not match 'bytes */<total>', as '' does not",
    ("stages.lib.fetch.x_parse_content_range",
     'match = _CONTENT_RANGE.fullmatch((value or "XXXX").strip())'):
        "with no value, 'XXXX' does not match 'bytes first-last/total', as '' does not",
    ("stages.lib.fetch.xǁFetcherǁ_raise_for_status",
     'wait = retry_after_seconds(exc.headers.get("retry-after"))'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_raise_for_status",
     'wait = retry_after_seconds(exc.headers.get("RETRY-AFTER"))'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_resume_point",
     'length = response.headers.get("content-length")'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_resume_point",
     'length = response.headers.get("CONTENT-LENGTH")'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_resume_point",
     'span = parse_content_range(response.headers.get("content-range"))'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_resume_point",
     'span = parse_content_range(response.headers.get("CONTENT-RANGE"))'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_resume_point",
     'f"unusable Content-Range {response.headers.get(\'content-range\')!r}")'): _HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_resume_point",
     'f"unusable Content-Range {response.headers.get(\'CONTENT-RANGE\')!r}")'): _HEADER_CASE,
    ("stages.lib.fetch.x_file_digest", 'def (path: Path, algorithm: str = "SHA256") -> str:'): (
        "hashlib (OpenSSL) takes algorithm names in either case: SHA256 is sha256"),
    ("stages.lib.fetch.xǁFetcherǁ_transfer",
     'headers = {"user-agent": "segflow", "Accept-Encoding": "identity"}'): _REQUEST_HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_transfer",
     'headers = {"USER-AGENT": "segflow", "Accept-Encoding": "identity"}'): _REQUEST_HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_transfer",
     'headers = {"User-Agent": "segflow", "accept-encoding": "identity"}'): _REQUEST_HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_transfer",
     'headers = {"User-Agent": "segflow", "ACCEPT-ENCODING": "identity"}'): _REQUEST_HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_transfer",
     'headers = {"User-Agent": "segflow", "XXAccept-EncodingXX": "identity"}'): (
        "http.client's putrequest sends 'Accept-Encoding: identity' itself unless told to skip "
        "it; the unknown XXAccept-EncodingXX header changes nothing a server here reads"),
    ("stages.lib.fetch.xǁFetcherǁ_transfer", 'headers["range"] = f"bytes={offset}-"'):
        _REQUEST_HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁ_transfer", 'headers["RANGE"] = f"bytes={offset}-"'):
        _REQUEST_HEADER_CASE,
    ("stages.lib.fetch.xǁFetcherǁfetch",
     "part.unlink(missing_ok=None)   # bad content: the next attempt starts over"): _PART_READ,
    ("stages.lib.fetch.xǁFetcherǁfetch",
     "part.unlink(missing_ok=False)   # bad content: the next attempt starts over"): _PART_READ,
    ("stages.lib.fetch.xǁFetcherǁ__init__", "self.on_bytes = on_bytes or (lambda n: 0)"): (
        "on_bytes is called for its effect only: fetch never reads what it returns"),
    ("stages.lib.fetch.xǁFetcherǁfetch", 'problem: Exception | None = ""'): (
        "problem is read only on a retry, and every attempt that leads to one assigns it first"),
    ("stages.lib.fetch.xǁ_FlooredReaderǁreadinto", "self._window_bytes += n or 1"): (
        "a blocking socket's read gives 0 only at the end of the stream, after which "
        "http.client reads no more: the window's count then is never used"),
    ("stages.lib.fetch.xǁFetcherǁ_copy_local",
     "self._copy_bounded(handle, out, 0, None, None, bound)"): _LOCAL_BOUND,
    ("stages.lib.fetch.xǁFetcherǁ_copy_local",
     "self._copy_bounded(handle, out, 0, bound and bound.bytes, None, None)"): _LOCAL_BOUND,
    ("stages.lib.fetch.xǁ_BoundedRedirectsǁredirect_request",
     "return super().redirect_request(req, None, code, msg, headers, newurl)"): _REDIRECT,
    ("stages.lib.fetch.xǁ_BoundedRedirectsǁredirect_request",
     "return super().redirect_request(req, fp, code, None, headers, newurl)"): _REDIRECT,
    ("stages.lib.fetch.xǁ_BoundedRedirectsǁredirect_request",
     "return super().redirect_request(req, fp, code, msg, None, newurl)"): _REDIRECT,
    # evaluate (measured on main 38ae560)
    ("stages.evaluate.x_main", 'parser.add_argument("--annotations", type=None,'): _STR_PATH,
    ("stages.evaluate.x_main", 'parser.add_argument("--categories", type=None,'): _STR_PATH,
    ("stages.evaluate.x_main", 'parser.add_argument("--per-image", type=None,'): _STR_PATH,
    ("stages.evaluate.x__write",
     "ignored = np.array([s.ignored for s in scored], None)"): _INT64,
    ("stages.evaluate.x__write", "ignored = np.array([s.ignored for s in scored], )"): _INT64,
    ("stages.evaluate.x__write", "cm = confusion[:, 0].sum(0, dtype=None)"): _INT64_SUM,
    ("stages.evaluate.x__write", "cm = confusion[:, 0].sum(0, )"): _INT64_SUM,
    ("stages.evaluate.x__write_categories",
     "class_names=np.array(class_names), seeds=np.array(seeds, None),"): _INT64,
    ("stages.evaluate.x__write_categories",
     "class_names=np.array(class_names), seeds=np.array(seeds, ),"): _INT64,
    ("stages.evaluate.x__write_categories",
     "ignored=np.array([s.ignored for s in scored], None),"): _INT64,
    ("stages.evaluate.x__write_categories",
     "ignored=np.array([s.ignored for s in scored], ),"): _INT64,
    ("stages.evaluate.x__write_categories",
     'category_ids=np.array([c["id"] for c in categories], None),'): _INT64,
    ("stages.evaluate.x__write_categories",
     'category_ids=np.array([c["id"] for c in categories], ),'): _INT64,
    ("stages.evaluate.x__write_categories", "for c in categories], None),"): _INT64,
    ("stages.evaluate.x__write_categories", "for c in categories], ),"): _INT64,
    ("stages.evaluate.x_val_instances",
     "if not d.crowd and d.rle is not None and d.pixels >= 0]"): _EMPTY_INSTANCE,
}

KILLED = {1, 3}  # pytest's exit codes for failed tests / internal error (mutmut's "killed")
TIMEOUT = {36, 24, -24, 152, 255}


def meta_path(module: str) -> Path:
    return ROOT / "mutants" / (module.split(" ")[0] + ".meta")


RECORD = ROOT / "benchmarks" / "out" / "mutate.json"


def results() -> dict[str, dict[str, int | None]]:
    """module -> {mutant name: exit code} for the mutants in MODULES' patterns: mutmut's
    latest verdict, else the one recorded in RECORD. mutmut forgets every verdict when its
    configuration changes (a test added to the selection), so each run's verdicts are kept
    there: a module run earlier keeps its score while another runs."""
    recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    out = {}
    for module, patterns in MODULES.items():
        codes = json.loads(meta_path(module).read_text())["exit_code_by_key"]
        out[module] = {name: code if code is not None else recorded.get(name)
                       for name, code in codes.items()
                       if any(fnmatch.fnmatch(name, p) for p in patterns)}
    return out


def mutated_lines(module: str, name: str, _trees: dict = {}) -> tuple[str, str]:  # noqa: B006
    """The original and the mutated text of a mutant's function, each the lines that differ
    joined and stripped: what a mutant is, whatever number mutmut gave it."""
    path = ROOT / "mutants" / module.split(" ")[0]
    if path not in _trees:
        source = path.read_text()
        lines = source.splitlines()
        # the def line without the function's name (mutmut's names differ), then the body
        _trees[path] = {n.name: [lines[n.lineno - 1].replace(f"def {n.name}(", "def (", 1),
                                 *lines[n.lineno:n.end_lineno]]
                        for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    functions = _trees[path]
    short = name.rsplit(".", 1)[1]
    orig = short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    a, b = (functions[k] for k in (orig, short))
    diff = [line for line in difflib.ndiff(a, b) if line[:2] in ("- ", "+ ")]
    return (" / ".join(x[2:].strip() for x in diff if x[0] == "-"),
            " / ".join(x[2:].strip() for x in diff if x[0] == "+"))


def equivalence(module: str, name: str) -> tuple[str, str] | None:
    """The EQUIVALENT key this mutant matches, if any."""
    function = name.rsplit("__mutmut_", 1)[0]
    if not any(f == function for f, _ in EQUIVALENT):
        return None
    key = (function, mutated_lines(module, name)[1])
    return key if key in EQUIVALENT else None


def record(by_module: dict[str, dict[str, int | None]]) -> None:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    codes = {n: c for module in by_module.values() for n, c in module.items() if c is not None}
    RECORD.write_text(json.dumps(codes, indent=0, sort_keys=True))


def score_rows(by_module: dict[str, dict[str, int | None]]) -> list[dict]:
    rows = []
    found = set()
    for module, codes in by_module.items():
        count = Counter()
        survivors = []
        for name, code in codes.items():
            key = equivalence(module, name)
            found.add(key)
            if code is None:
                count["not_checked"] += 1
            elif code in KILLED or code in TIMEOUT:
                count["killed"] += 1
                if key:
                    raise SystemExit(f"{name} {key} is listed as equivalent but a test killed it")
            elif key:
                count["equivalent"] += 1
            else:
                count["survived"] += 1
                survivors.append(name)
        live = len(codes) - count["equivalent"] - count["not_checked"]
        rows.append({"module": module, "mutants": len(codes), "killed": count["killed"],
                     "survived": count["survived"], "equivalent": count["equivalent"],
                     "not_checked": count["not_checked"],
                     "score": count["killed"] / live if live else float("nan"),
                     "survivors": sorted(survivors)})
    missing = set(EQUIVALENT) - found
    if missing:
        raise SystemExit(f"listed as equivalent but no such mutant: {sorted(missing)}")
    return rows


def readable(function: str) -> str:
    """A mutant's function as the source names it: mutmut's x_f is f, its xǁCǁm is C.m."""
    module, _, name = function.rpartition(".")
    if name.startswith("xǁ"):
        return f"{module}.{name[2:].replace('ǁ', '.')}"
    return f"{module}.{name.removeprefix('x_')}"


def markdown(rows: list[dict]) -> str:
    lines = ["| module | mutants | killed | survived | equivalent | not run | score |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        score = "not run" if r["score"] != r["score"] else f"{100 * r['score']:.1f}%"
        lines.append(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | "
                     f"{r['equivalent']} | {r['not_checked']} | {score} |")
    lines += ["", "Equivalent mutants (left out of the score):", ""]
    lines += [f"- `{readable(function)}`: `{mutated}`: {why}"
              for (function, mutated), why in sorted(EQUIVALENT.items())]
    return "\n".join(lines) + "\n"


def run_mutmut(modules: list[str], mutants: list[str] = ()) -> None:
    patterns = [p for m in modules for p in MODULES[m]] + list(mutants)
    mutmut = Path(sys.executable).parent / "mutmut"
    subprocess.run([str(mutmut), "run", "--max-children", "1", *patterns], cwd=ROOT,
                   check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=first_sentence(__doc__))
    parser.add_argument("--no-run", action="store_true",
                        help="only score the results of the last run")
    parser.add_argument("--markdown", type=Path, help="write the score table here too")
    parser.add_argument("--module", action="append", choices=list(MODULES),
                        help="run only these modules' mutants (default: all)")
    parser.add_argument("--mutant", action="append", default=[],
                        help="run this mutant too (mutmut's name, or a glob of names): a "
                             "survivor again once a test aims at it")
    args = parser.parse_args(argv)
    start, load = time.monotonic(), os.getloadavg()
    if (ROOT / "mutants").exists():
        record(results())
    if not args.no_run:
        run_mutmut(args.module or ([] if args.mutant else list(MODULES)), args.mutant)
    by_module = results()
    record(by_module)
    rows = score_rows(by_module)
    table = markdown(rows)
    print(table)
    for r in rows:
        for name in r["survivors"]:
            print(f"survived: {name}  (mutmut show {name})")
    if not args.no_run:
        print(f"wall {time.monotonic() - start:.0f} s; load average at start "
              f"{load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
