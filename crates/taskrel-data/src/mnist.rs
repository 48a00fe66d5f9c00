//! MNIST and Fashion-MNIST in the IDX format (LeCun et al. 1998; Xiao et al. 2017).
//!
//! An IDX file is a big-endian header, magic `0x00000803` (2051) then `n, rows, cols` for
//! images, magic `0x00000801` (2049) then `n` for labels, followed by u8 payload. Files may be
//! plain or gzipped and named `train-images-idx3-ubyte` or `train-images.idx3-ubyte`.

use std::io::Read;
use std::path::Path;

use crate::dataset::{Dataset, Images, Inputs};
use crate::error::{Error, Result};
use crate::files;

/// Magic number of an IDX file of u8 images (3 dimensions).
pub const IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX file of u8 labels (1 dimension).
pub const LABELS_MAGIC: u32 = 2049;

/// Class names of MNIST.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
/// Class names of Fashion-MNIST, in label order.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The file names tried for `prefix` (`train` or `t10k`) and `kind` (`images`/`idx3` or
/// `labels`/`idx1`), most common first.
fn names(prefix: &str, kind: &str, idx: &str) -> Vec<String> {
    let stems = [
        format!("{prefix}-{kind}-{idx}-ubyte"),
        format!("{prefix}-{kind}.{idx}-ubyte"),
    ];
    stems
        .iter()
        .flat_map(|s| [format!("{s}.gz"), s.clone()])
        .collect()
}

/// Loads one split (`prefix` = `train` or `t10k`) from `dir`, or `None` when neither of its
/// files exists. One file without the other is an error.
pub(crate) fn load_split(dir: &Path, prefix: &str, classes: &[&str]) -> Result<Option<Dataset>> {
    let image_names = names(prefix, "images", "idx3");
    let label_names = names(prefix, "labels", "idx1");
    if files::find_optional(dir, &image_names).is_none()
        && files::find_optional(dir, &label_names).is_none()
    {
        return Ok(None);
    }
    let images_path = files::find(dir, &image_names)?;
    let labels_path = files::find(dir, &label_names)?;
    let images = read_images(&images_path)?;
    let labels = read_labels(&labels_path, classes.len())?;
    if images.n != labels.len() {
        return Err(Error::format(
            &labels_path,
            "header",
            format!(
                "{} labels but {} holds {} images",
                labels.len(),
                images_path.display(),
                images.n
            ),
        ));
    }
    let classes = classes.iter().map(|c| c.to_string()).collect();
    Ok(Some(Dataset {
        inputs: Inputs::Images(images),
        labels,
        classes,
    }))
}

fn read_header(
    path: &Path,
    reader: &mut dyn Read,
    fields: usize,
    magic: u32,
) -> Result<Vec<usize>> {
    let mut word = [0u8; 4];
    read_exact(path, reader, &mut word, 0, "header")?;
    let found = u32::from_be_bytes(word);
    if found != magic {
        return Err(Error::format(
            path,
            "header",
            format!("expected magic number {magic} (0x{magic:08x}), found {found} (0x{found:08x})"),
        ));
    }
    let mut dims = Vec::with_capacity(fields);
    for k in 0..fields {
        read_exact(path, reader, &mut word, 4 * (k + 1), "header")?;
        dims.push(u32::from_be_bytes(word) as usize);
    }
    Ok(dims)
}

fn read_exact(
    path: &Path,
    reader: &mut dyn Read,
    buf: &mut [u8],
    offset: usize,
    what: &str,
) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if offset + filled == 0 => {
                return Err(Error::format(
                    path,
                    "byte 0",
                    format!("empty file, expected an IDX {what}"),
                ));
            }
            Ok(0) => {
                return Err(Error::format(
                    path,
                    format!("byte {}", offset + filled),
                    format!(
                        "file truncated: expected {} bytes of {what}, found {filled}",
                        buf.len()
                    ),
                ));
            }
            Ok(k) => filled += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}

fn expect_end(path: &Path, reader: &mut dyn Read, offset: usize) -> Result<()> {
    let mut probe = [0u8; 1];
    match reader.read(&mut probe) {
        Ok(0) => Ok(()),
        Ok(_) => Err(Error::format(
            path,
            format!("byte {offset}"),
            "unexpected data after the last record",
        )),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Reads an IDX image file (magic 2051) into u8 images `(n, 1, rows, cols)`.
pub fn read_images(path: &Path) -> Result<Images> {
    let mut reader = files::open(path)?;
    let dims = read_header(path, &mut reader, 3, IMAGES_MAGIC)?;
    let (n, height, width) = (dims[0], dims[1], dims[2]);
    if height == 0 || width == 0 || height > 4096 || width > 4096 {
        return Err(Error::format(
            path,
            "header",
            format!("implausible image size {height}x{width}"),
        ));
    }
    let mut pixels = vec![0u8; n * height * width];
    read_exact(path, &mut reader, &mut pixels, 16, "pixels")?;
    expect_end(path, &mut reader, 16 + pixels.len())?;
    Ok(Images {
        pixels,
        n,
        channels: 1,
        height,
        width,
    })
}

/// Reads an IDX label file (magic 2049); every label must be `< num_classes`.
pub fn read_labels(path: &Path, num_classes: usize) -> Result<Vec<u32>> {
    let mut reader = files::open(path)?;
    let n = read_header(path, &mut reader, 1, LABELS_MAGIC)?[0];
    let mut bytes = vec![0u8; n];
    read_exact(path, &mut reader, &mut bytes, 8, "labels")?;
    expect_end(path, &mut reader, 8 + n)?;
    if let Some(i) = bytes.iter().position(|&y| y as usize >= num_classes) {
        return Err(Error::format(
            path,
            format!("byte {}", 8 + i),
            format!("label {} out of range, expected 0..{num_classes}", bytes[i]),
        ));
    }
    Ok(bytes.into_iter().map(u32::from).collect())
}
