//! PyTorch `.pth` state dicts read with bounds: candle's reader builds the pickle's objects
//! recursively and allocates each tensor at its declared size before reading it, so a hostile
//! file could exhaust the stack or the memory. Here the pickle is first walked without
//! building anything (nesting depth and object count bounded), and every tensor's declared
//! extent is checked against the bytes its storage entry holds, before candle reads it.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Deepest nesting of pickled objects accepted (a state dict needs fewer than ten).
const MAX_DEPTH: u64 = 200;
/// Most objects the pickle may build, counting each copy a memo reference makes.
const MAX_OBJECTS: u64 = 10_000_000;

/// Every tensor of the state dict at `path`, in name order.
pub(crate) fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |message: String| Error::file(path, message);
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch state dict: {e}")))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| bad(format!("not a PyTorch state dict: {e}")))?;
    for name in names.iter().filter(|n| n.ends_with("data.pkl")) {
        let entry = zip
            .by_name(name)
            .map_err(|e| bad(format!("not a PyTorch state dict: {name}: {e}")))?;
        let mut pickle = Vec::new();
        entry
            .take(file_len)
            .read_to_end(&mut pickle)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        scan_pickle(&pickle).map_err(|m| bad(format!("{name}: {m}")))?;
    }
    let pth = candle_core::pickle::PthTensors::new(path, None)
        .map_err(|e| bad(format!("not a PyTorch state dict: {e}")))?;
    let mut infos: Vec<_> = pth.tensor_infos().values().collect();
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        let held = zip
            .by_name(&info.path)
            .map_err(|e| bad(format!("tensor {}: storage {}: {e}", info.name, info.path)))?
            .size();
        let layout = &info.layout;
        let elements = layout.shape().elem_count() as u128;
        let span = if elements == 0 {
            0
        } else {
            1 + layout
                .dims()
                .iter()
                .zip(layout.stride())
                .map(|(&n, &s)| (n as u128).saturating_sub(1) * s as u128)
                .sum::<u128>()
        };
        let needed = (layout.start_offset() as u128 + elements.max(span))
            * info.dtype.size_in_bytes() as u128;
        if needed > u128::from(held) {
            return Err(bad(format!(
                "tensor {} declares shape {:?} of {:?} at offset {} ({needed} bytes), but its storage {} holds {held} bytes",
                info.name,
                layout.dims(),
                info.dtype,
                layout.start_offset(),
                info.path
            )));
        }
        let tensor = pth
            .get(&info.name)
            .map_err(|e| bad(format!("tensor {}: {e}", info.name)))?
            .ok_or_else(|| bad(format!("tensor {} vanished while reading", info.name)))?;
        tensors.push((info.name.clone(), tensor));
    }
    Ok(tensors)
}

/// Walks the opcodes candle's reader understands, tracking for each stack value the depth and
/// object count of what it would build, without building it. Stops quietly at an opcode or a
/// stack state candle itself refuses (it then reports its own error).
fn scan_pickle(bytes: &[u8]) -> std::result::Result<(), String> {
    // (depth, objects) of each stack value; `None` marks a MARK.
    let mut stack: Vec<Option<(u64, u64)>> = Vec::new();
    let mut memo: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    };
    let u32_le = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    // A memo index: one byte (BINPUT, BINGET) or four (LONG_BINPUT, LONG_BINGET).
    let memo_index = |at: &mut usize, short: bool| -> Option<u32> {
        if short {
            take(at, 1).map(|s| u32::from(s[0]))
        } else {
            take(at, 4).map(u32_le)
        }
    };
    // Pops values down to the last mark (dropping it).
    let to_mark = |stack: &mut Vec<Option<(u64, u64)>>| -> Option<Vec<(u64, u64)>> {
        let mark = stack.iter().rposition(Option::is_none)?;
        let items = stack.drain(mark..).flatten().collect();
        Some(items)
    };
    let join = |items: &[(u64, u64)]| -> (u64, u64) {
        let depth = items.iter().map(|i| i.0).max().unwrap_or(0) + 1;
        let objects = items.iter().fold(1u64, |acc, i| acc.saturating_add(i.1));
        (depth, objects)
    };
    loop {
        let Some(&op) = bytes.get(at) else {
            return Ok(());
        };
        at += 1;
        let leaf = Some((1, 1));
        let pushed = match op {
            0x80 | b'K' => take(&mut at, 1).map(|_| leaf),
            b'M' => take(&mut at, 2).map(|_| leaf),
            b'J' => take(&mut at, 4).map(|_| leaf),
            b'G' => take(&mut at, 8).map(|_| leaf),
            0x8a => take(&mut at, 1)
                .and_then(|n| take(&mut at, n[0] as usize))
                .map(|_| leaf),
            b'X' => take(&mut at, 4)
                .map(u32_le)
                .and_then(|n| take(&mut at, n as usize))
                .map(|_| leaf),
            b'c' => {
                // Module and name, each ended by a newline.
                let mut lines = 0;
                while lines < 2 {
                    let &b = bytes.get(at).ok_or("GLOBAL runs past the end")?;
                    at += 1;
                    lines += usize::from(b == b'\n');
                }
                Some(leaf)
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' => Some(leaf),
            b'(' => Some(None),
            b't' | b'd' => to_mark(&mut stack).map(|items| Some(join(&items))),
            0x85..=0x87 => {
                let k = usize::from(op - 0x84);
                (stack.len() >= k)
                    .then(|| stack.split_off(stack.len() - k))
                    .and_then(|items| items.into_iter().collect::<Option<Vec<_>>>())
                    .map(|items| Some(join(&items)))
            }
            b'R' | 0x81 => {
                // callable/class and arguments become one object.
                (stack.len() >= 2)
                    .then(|| stack.split_off(stack.len() - 2))
                    .and_then(|items| items.into_iter().collect::<Option<Vec<_>>>())
                    .map(|items| Some(join(&items)))
            }
            b'Q' => stack.pop().flatten().map(|pid| Some(join(&[pid]))),
            b'a' | b's' | b'b' | b'e' | b'u' => {
                // Values added into (or set on) the object below them.
                let items = match op {
                    b'a' | b'b' => stack.pop().flatten().map(|v| vec![v]),
                    b's' => (stack.len() >= 2)
                        .then(|| stack.split_off(stack.len() - 2))
                        .and_then(|items| items.into_iter().collect()),
                    _ => to_mark(&mut stack),
                };
                match (items, stack.last_mut()) {
                    (Some(items), Some(Some(target))) => {
                        // The container gets one level above its deepest item, and all their
                        // objects.
                        let added = join(&items);
                        *target = (target.0.max(added.0), target.1.saturating_add(added.1 - 1));
                        check(*target)?;
                        continue;
                    }
                    _ => return Ok(()),
                }
            }
            b'q' | b'r' => match (memo_index(&mut at, op == b'q'), stack.last()) {
                (Some(i), Some(Some(top))) => {
                    memo.insert(i, *top);
                    continue;
                }
                _ => return Ok(()),
            },
            b'h' | b'j' => memo_index(&mut at, op == b'h')
                .and_then(|i| memo.get(&i).copied())
                .map(Some),
            b'.' => return Ok(()),
            _ => return Ok(()),
        };
        match pushed {
            Some(value) => {
                if let Some(v) = value {
                    check(v)?;
                }
                stack.push(value);
            }
            None => return Ok(()),
        }
    }
}

fn check((depth, objects): (u64, u64)) -> std::result::Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "the pickle nests objects deeper than {MAX_DEPTH} levels; not a state dict"
        ));
    }
    if objects > MAX_OBJECTS {
        return Err(format!(
            "the pickle builds more than {MAX_OBJECTS} objects; not a state dict"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn unicode(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
        out
    }

    fn int(v: i32) -> Vec<u8> {
        let mut out = vec![b'J'];
        out.extend(v.to_le_bytes());
        out
    }

    /// A state dict `{"w": tensor}` as PyTorch pickles it: float storage `archive/data/0` of
    /// `storage` elements, viewed at `shape` with `stride`.
    fn state_dict(storage: i32, shape: [i32; 2], stride: [i32; 2]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}'];
        p.extend(unicode("w"));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        p.extend(unicode("storage"));
        p.extend(b"ctorch\nFloatStorage\n");
        p.extend(unicode("0"));
        p.extend(unicode("cpu"));
        p.extend(int(storage));
        p.extend(b"tQ");
        p.extend(int(0));
        p.extend(int(shape[0]));
        p.extend(int(shape[1]));
        p.push(0x86);
        p.extend(int(stride[0]));
        p.extend(int(stride[1]));
        p.extend([0x86, 0x89, b')', b't', b'R', b's', b'.']);
        p
    }

    fn pth(dir: &Path, name: &str, pickle: &[u8], data: &[u8]) -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        let io = |e: &dyn std::fmt::Display| Error::file(&path, e.to_string());
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).map_err(|e| io(&e))?);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (entry, bytes) in [("archive/data.pkl", pickle), ("archive/data/0", data)] {
            zip.start_file(entry, stored).map_err(|e| io(&e))?;
            zip.write_all(bytes).map_err(|e| io(&e))?;
        }
        zip.finish().map_err(|e| io(&e))?;
        Ok(path)
    }

    #[test]
    fn a_state_dict_within_its_storage_loads() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let path = pth(dir.path(), "ok.pth", &state_dict(4, [2, 2], [2, 1]), &data)?;
        let tensors = read_state_dict(&path)?;
        assert_eq!(tensors.len(), 1);
        assert_eq!(tensors[0].0, "w");
        assert_eq!(tensors[0].1.to_vec2::<f32>()?, [[1.0, 2.0], [3.0, 4.0]]);
        Ok(())
    }

    #[test]
    fn hostile_pickles_are_refused_before_anything_is_built() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let data = [0u8; 16];
        // A tensor far larger than its storage (candle would allocate 4 TB first).
        let huge = state_dict(4, [1_000_000, 1_000_000], [1_000_000, 1]);
        // A tuple nested 100,000 deep (candle would recurse that deep dropping it).
        let mut deep = vec![0x80, 2, b')'];
        deep.extend(std::iter::repeat_n(0x85, 100_000));
        deep.push(b'.');
        // A tuple of two references to itself, 40 times over: 2^40 objects once copied.
        let mut laughs = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            laughs.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        laughs.push(b'.');
        for (name, pickle, message) in [
            (
                "huge.pth",
                huge,
                "tensor w declares shape [1000000, 1000000] of F32 at offset 0 (4000000000000 bytes), but its storage archive/data/0 holds 16 bytes",
            ),
            ("deep.pth", deep, "nests objects deeper than 200 levels"),
            ("laughs.pth", laughs, "builds more than 10000000 objects"),
        ] {
            let path = pth(dir.path(), name, &pickle, &data)?;
            let Err(err) = read_state_dict(&path) else {
                panic!("{name} was read");
            };
            let err = err.to_string();
            assert!(err.contains(name) && err.contains(message), "{name}: {err}");
        }
        Ok(())
    }
}
