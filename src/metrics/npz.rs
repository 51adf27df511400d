//! NumPy `.npz` statistics files, as pytorch-fid's `--save-stats` writes them
//! (`np.savez_compressed(path, mu=mu, sigma=sigma)`: a zip archive of `mu.npy` [D] and
//! `sigma.npy` [D, D], deflated) and as the published TTUR / pytorch-fid reference statistics
//! come (`np.savez`, stored). Read: float32 or float64, either byte order, C or Fortran order,
//! NPY format versions 1–3. Written: float64 (pytorch-fid's `sigma` dtype; its `mu` is the
//! float32 mean of float32 activations, which float64 holds exactly).

use std::io::{Cursor, Read, Write};
use std::path::Path;

use nalgebra::{DMatrix, DVector};

use super::stats::FeatureStats;
use crate::error::{Error, Result};
use crate::io;

/// One array of an `.npy` file: its shape and values (row-major, as f64).
#[derive(Debug)]
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// Parses the `.npy` bytes of `name` (errors name `path` and the array).
fn parse_npy(bytes: &[u8], path: &Path, name: &str) -> Result<Array> {
    let bad = |m: String| Error::file(path, format!("`{name}.npy`: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a NumPy .npy array (no \\x93NUMPY magic)".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy format version {v}"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| bad("truncated header".into()))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = header[at + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr").ok_or_else(|| bad("no `descr` in the header".into()))?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| bad("unreadable `descr`".into()))?
        .to_string();
    let fortran = field("fortran_order").is_some_and(|f| f.starts_with("True"));
    let shape_text = field("shape").ok_or_else(|| bad("no `shape` in the header".into()))?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("unreadable `shape`".into()))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad(format!("unreadable `shape` {inner:?}")))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape too large".into()))?;
    let body = &bytes[start + header_len..];
    let (width, little, float64) = match descr.as_str() {
        "<f8" | "=f8" | "|f8" => (8, true, true),
        ">f8" => (8, false, true),
        "<f4" | "=f4" | "|f4" => (4, true, false),
        ">f4" => (4, false, false),
        other => {
            return Err(bad(format!("dtype {other:?}; expected float32 or float64")));
        }
    };
    if body.len() < count * width {
        return Err(bad(format!(
            "truncated: {} bytes for {count} values of {width} bytes",
            body.len()
        )));
    }
    let mut data: Vec<f64> = body[..count * width]
        .chunks_exact(width)
        .map(|b| match (float64, little) {
            (true, true) => f64::from_le_bytes(b.try_into().expect("8 bytes")),
            (true, false) => f64::from_be_bytes(b.try_into().expect("8 bytes")),
            (false, true) => f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            (false, false) => f32::from_be_bytes(b.try_into().expect("4 bytes")) as f64,
        })
        .collect();
    if fortran && shape.len() == 2 {
        // Column-major [r, c] to row-major.
        let (r, c) = (shape[0], shape[1]);
        data = (0..r * c).map(|k| data[(k % c) * r + k / c]).collect();
    }
    Ok(Array { shape, data })
}

/// The `.npy` bytes of a float64 C-order array (NPY 1.0, header padded to 64 bytes).
fn npy_bytes(shape: &[usize], data: impl Iterator<Item = f64>) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {dims}, }}");
    // numpy pads with spaces and ends with a newline so that data starts 64-byte aligned.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 8 * shape.iter().product::<usize>());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads `mu` and `sigma` from a pytorch-fid / TTUR `.npz` file.
pub fn read(path: &Path) -> Result<FeatureStats> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, "statistics file not found"),
        _ => Error::file(path, format!("cannot read: {e}")),
    })?;
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| Error::file(path, format!("not a NumPy .npz (zip) file: {e}")))?;
    let mut take = |name: &str| -> Result<Array> {
        let mut entry = archive.by_name(&format!("{name}.npy")).map_err(|_| {
            Error::file(
                path,
                format!("no `{name}` array (expected `mu` [D] and `sigma` [D, D], as pytorch-fid's --save-stats writes)"),
            )
        })?;
        let mut raw = Vec::new();
        entry
            .read_to_end(&mut raw)
            .map_err(|e| Error::file(path, format!("`{name}.npy`: cannot decompress: {e}")))?;
        parse_npy(&raw, path, name)
    };
    let mu = take("mu")?;
    let sigma = take("sigma")?;
    let d = mu.data.len();
    if mu.shape.len() != 1 || sigma.shape != [d, d] {
        return Err(Error::file(
            path,
            format!(
                "`mu` {:?} and `sigma` {:?} do not fit: expected [D] and [D, D]",
                mu.shape, sigma.shape
            ),
        ));
    }
    Ok(FeatureStats {
        mu: DVector::from_vec(mu.data),
        sigma: DMatrix::from_row_slice(d, d, &sigma.data),
        count: 0,
    })
}

/// Writes `stats` as pytorch-fid's `np.savez_compressed(path, mu=mu, sigma=sigma)` does (deflated
/// `mu.npy` and `sigma.npy`), atomically.
pub fn write(path: &Path, stats: &FeatureStats) -> Result<()> {
    let d = stats.mu.len();
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let fail = |e: String| Error::file(path, format!("cannot write the .npz archive: {e}"));
    let mu = npy_bytes(&[d], stats.mu.iter().copied());
    // nalgebra is column-major; `row(i)` walks a row of the symmetric covariance.
    let sigma = npy_bytes(
        &[d, d],
        (0..d)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .map(|(i, j)| stats.sigma[(i, j)]),
    );
    for (name, bytes) in [("mu.npy", mu), ("sigma.npy", sigma)] {
        zip.start_file(name, options)
            .map_err(|e| fail(e.to_string()))?;
        zip.write_all(&bytes).map_err(|e| fail(e.to_string()))?;
    }
    let bytes = zip.finish().map_err(|e| fail(e.to_string()))?.into_inner();
    io::write_atomic(path, &bytes)
}

/// Whether `path` names a NumPy `.npz` file (by extension).
pub fn is_npz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npz_round_trips_and_reads_fortran_float32() {
        let stats = FeatureStats {
            mu: DVector::from_vec(vec![1.0, -2.5, 3.25]),
            sigma: DMatrix::from_row_slice(3, 3, &[2.0, 0.5, 0.1, 0.5, 3.0, 0.2, 0.1, 0.2, 4.0]),
            count: 7,
        };
        let path = std::env::temp_dir().join(format!("fewstep-npz-{}.npz", std::process::id()));
        write(&path, &stats).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.mu, stats.mu);
        assert_eq!(back.sigma, stats.sigma);
        let _ = std::fs::remove_file(&path);

        let header = "{'descr': '>f4', 'fortran_order': True, 'shape': (2, 3), }";
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
        npy.extend_from_slice(header.as_bytes());
        // Column-major [[1, 2, 3], [4, 5, 6]] in big-endian f32.
        for v in [1f32, 4.0, 2.0, 5.0, 3.0, 6.0] {
            npy.extend_from_slice(&v.to_be_bytes());
        }
        let a = parse_npy(&npy, Path::new("x.npz"), "sigma").unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let e = parse_npy(b"garbage", Path::new("x.npz"), "mu")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.npz: `mu.npy`"), "{e}");
    }
}
