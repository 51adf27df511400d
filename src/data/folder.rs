//! Image folders: png/jpeg/webp files under a directory, decoded once (in parallel), resized so
//! the shorter side equals the model's `sample_size`, centre-cropped to a square and kept in memory
//! as 8-bit RGB. Batches apply a random horizontal flip, as diffusers' `train_unconditional.py`
//! does (`RandomHorizontalFlip`).
//!
//! Class labels follow torchvision's `ImageFolder`: when the images sit in sub-folders, each
//! sub-folder (sorted by name) is a class; images directly under the root have no class.
//! Unreadable files are skipped and reported by the caller, not fatal; a folder with no readable
//! image is an error.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::imageops::FilterType;

use crate::error::{Error, Result};

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// A decoded image folder.
pub struct ImageFolder {
    pub root: PathBuf,
    pub size: usize,
    /// `size × size × 3` bytes per image, HWC.
    images: Vec<Vec<u8>>,
    /// Class of each image (`None` for images directly under the root).
    labels: Vec<Option<usize>>,
    /// The file of each image.
    pub files: Vec<PathBuf>,
    /// Sub-folder names, the class names.
    pub classes: Vec<String>,
    /// Files with an image extension that could not be decoded, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
}

impl ImageFolder {
    /// Reads every image under `root` (recursively) at `size × size`; errors name `--data`.
    pub fn open(root: &Path, size: usize) -> Result<Self> {
        Self::open_for(root, size, "--data")
    }

    /// [`open`](Self::open), errors naming `flag` (`--images` for `eval fid`).
    pub fn open_for(root: &Path, size: usize, flag: &str) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::file(
                root,
                format!("{flag}: not a folder (expected a folder of png/jpeg/webp images)"),
            ));
        }
        let mut files = Vec::new();
        list_images(root, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::file(
                root,
                format!("{flag}: no png/jpeg/webp images in this folder"),
            ));
        }
        let classes = classes_of(root, &files);

        use rayon::prelude::*;
        let decoded: Vec<std::result::Result<Vec<u8>, String>> =
            files.par_iter().map(|f| decode(f, size)).collect();
        let mut folder = ImageFolder {
            root: root.to_path_buf(),
            size,
            images: Vec::new(),
            labels: Vec::new(),
            files: Vec::new(),
            classes,
            unreadable: Vec::new(),
        };
        for (file, pixels) in files.into_iter().zip(decoded) {
            match pixels {
                Ok(p) => {
                    let label = class_of(root, &file)
                        .map(|c| folder.classes.binary_search(&c).expect("listed class"));
                    folder.images.push(p);
                    folder.labels.push(label);
                    folder.files.push(file);
                }
                Err(why) => folder.unreadable.push((file, why)),
            }
        }
        if folder.images.is_empty() {
            return Err(Error::file(
                root,
                format!(
                    "{flag}: none of the {} image files could be read (first: {})",
                    folder.unreadable.len(),
                    describe_unreadable(&folder.unreadable)
                ),
            ));
        }
        Ok(folder)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Whether every image has a class (all images sit in class sub-folders).
    pub fn fully_labelled(&self) -> bool {
        !self.classes.is_empty() && self.labels.iter().all(Option::is_some)
    }

    /// Images `indices`, flipped left-right where `flips` says so: ([B, 3, S, S] in [−1, 1],
    /// class labels [B], 0 for images without a class).
    pub fn batch(
        &self,
        indices: &[usize],
        flips: &[bool],
        device: &Device,
    ) -> (Tensor<4>, Tensor<1, Int>) {
        let s = self.size;
        let mut pixels = Vec::with_capacity(indices.len() * 3 * s * s);
        for (&i, &flip) in indices.iter().zip(flips) {
            let img = &self.images[i];
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let sx = if flip { s - 1 - x } else { x };
                        pixels.push(img[(y * s + sx) * 3 + c] as f32 / 127.5 - 1.0);
                    }
                }
            }
        }
        let labels: Vec<i64> = indices
            .iter()
            .map(|&i| self.labels[i].unwrap_or(0) as i64)
            .collect();
        (
            Tensor::<1>::from_floats(pixels.as_slice(), device).reshape([indices.len(), 3, s, s]),
            Tensor::<1, Int>::from_ints(labels.as_slice(), device),
        )
    }
}

/// The metadata file of Hugging Face's `imagefolder` layout.
pub const METADATA_FILE: &str = "metadata.jsonl";

impl ImageFolder {
    /// The caption of every image, in image order: from `metadata.jsonl` at the root (Hugging
    /// Face `imagefolder`: one JSON object per line with `file_name`, relative to the root, and
    /// the `column` caption), else from a `.txt` beside each image (kohya's sidecars). A missing,
    /// empty or non-UTF-8 caption is an error naming the file.
    pub fn captions(&self, column: &str) -> Result<Vec<String>> {
        let metadata = self.root.join(METADATA_FILE);
        if metadata.is_file() {
            return self.metadata_captions(&metadata, column);
        }
        self.files
            .iter()
            .map(|file| {
                let sidecar = file.with_extension("txt");
                let bytes = std::fs::read(&sidecar).map_err(|_| {
                    Error::file(
                        file,
                        format!(
                            "no caption: expected {} beside it (kohya) or a {METADATA_FILE} at the folder's root (imagefolder)",
                            sidecar
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default()
                        ),
                    )
                })?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::file(&sidecar, "caption is not UTF-8 text"))?;
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if text.is_empty() {
                    return Err(Error::file(&sidecar, "empty caption"));
                }
                Ok(text)
            })
            .collect()
    }

    fn metadata_captions(&self, metadata: &Path, column: &str) -> Result<Vec<String>> {
        let bytes = std::fs::read(metadata)
            .map_err(|e| Error::file(metadata, format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::file(metadata, "not UTF-8 text (expected JSON lines)"))?;
        let mut by_file = std::collections::HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let at = |what: String| Error::file(metadata, format!("line {}: {what}", n + 1));
            if line.trim().is_empty() {
                continue;
            }
            let row: serde_json::Value =
                serde_json::from_str(line).map_err(|e| at(format!("not a JSON object: {e}")))?;
            let name = row
                .get("file_name")
                .and_then(|v| v.as_str())
                .ok_or_else(|| at("no `file_name` string".into()))?;
            let caption = match row.get(column) {
                Some(serde_json::Value::String(s)) => {
                    s.split_whitespace().collect::<Vec<_>>().join(" ")
                }
                Some(_) => {
                    return Err(at(format!("`{column}` is not a string (--caption-column)")));
                }
                None => {
                    return Err(at(format!(
                        "no `{column}` column (--caption-column names the caption column)"
                    )));
                }
            };
            if caption.is_empty() {
                return Err(at(format!("empty caption in `{column}` for {name}")));
            }
            let path = self.root.join(name);
            if !path.is_file() {
                return Err(at(format!("file_name {name}: no such file in the folder")));
            }
            by_file.insert(path, caption);
        }
        self.files
            .iter()
            .map(|f| {
                by_file.get(f).cloned().ok_or_else(|| {
                    Error::file(
                        f,
                        format!("no caption: {METADATA_FILE} has no row for this image"),
                    )
                })
            })
            .collect()
    }
}

/// "a.png (reason), b.jpg (reason), c.webp (reason)" for the first three unreadable files.
pub fn describe_unreadable(unreadable: &[(PathBuf, String)]) -> String {
    // One line: decoders' messages may span several.
    let one_line = |why: &str| why.split_whitespace().collect::<Vec<_>>().join(" ");
    match unreadable {
        [] => String::new(),
        [(p, why)] => format!("{} ({})", p.display(), one_line(why)),
        [(p, why), rest @ ..] => format!(
            "{} ({}) and {} more",
            p.display(),
            one_line(why),
            rest.len()
        ),
    }
}

/// The class names (sub-folders holding images) of the folder at `root`, without decoding.
pub fn class_names(root: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    list_images(root, &mut files)?;
    Ok(classes_of(root, &files))
}

fn classes_of(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut classes: Vec<String> = files.iter().filter_map(|f| class_of(root, f)).collect();
    classes.sort();
    classes.dedup();
    classes
}

fn list_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?;
    for entry in entries {
        let path = entry
            .map_err(|e| Error::file(dir, format!("cannot list: {e}")))?
            .path();
        if path.is_dir() {
            list_images(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The first path component below `root`, when the file sits in a sub-folder.
fn class_of(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let mut parts = rel.components();
    let first = parts.next()?;
    parts.next()?; // a file directly under the root has no class
    Some(first.as_os_str().to_string_lossy().into_owned())
}

/// Decodes `file`, resizes its shorter side to `size` (Catmull-Rom, antialiased by the `image`
/// crate's separable filter) and centre-crops: `size × size × 3` bytes.
fn decode(file: &Path, size: usize) -> std::result::Result<Vec<u8>, String> {
    let img = image::ImageReader::open(file)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let scale = size as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).max(size as u32);
    let nh = ((h as f64 * scale).round() as u32).max(size as u32);
    let resized = image::imageops::resize(&img, nw, nh, FilterType::CatmullRom);
    let x0 = (nw - size as u32) / 2;
    let y0 = (nh - size as u32) / 2;
    let cropped = image::imageops::crop_imm(&resized, x0, y0, size as u32, size as u32).to_image();
    Ok(cropped.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty scratch folder, removed when the test passes.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn scratch(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("fewstep-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    #[test]
    fn resizes_crops_flips_and_labels_by_subfolder() {
        let root = scratch("ok");
        std::fs::create_dir_all(root.join("cats")).unwrap();
        std::fs::create_dir_all(root.join("dogs")).unwrap();
        // 16×8: left half red, right half blue → after resize to 4 (8 wide) and centre crop,
        // columns 0..2 red, 2..4 blue.
        let wide = image::RgbImage::from_fn(16, 8, |x, _| {
            if x < 8 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        wide.save(root.join("dogs/wide.png")).unwrap();
        image::RgbImage::from_pixel(5, 9, image::Rgb([0, 255, 0]))
            .save(root.join("cats/tall.jpg"))
            .unwrap();
        std::fs::write(root.join("cats/broken.png"), b"not an image").unwrap();
        std::fs::write(root.join("notes.txt"), b"ignored").unwrap();

        let folder = ImageFolder::open(&root, 4).unwrap();
        assert_eq!(folder.len(), 2);
        assert_eq!(folder.classes, vec!["cats", "dogs"]);
        assert!(folder.fully_labelled());
        assert_eq!(folder.unreadable.len(), 1);
        assert!(folder.unreadable[0].0.ends_with("cats/broken.png"));

        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let (x, labels) = folder.batch(&[1, 1, 0], &[false, true, false], &device);
        assert_eq!(x.dims(), [3, 3, 4, 4]);
        assert_eq!(
            labels
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap(),
            vec![1, 1, 0]
        );
        let v = x.into_data().try_to_vec::<f32>().unwrap();
        let px = |b: usize, c: usize, y: usize, xx: usize| v[((b * 3 + c) * 4 + y) * 4 + xx];
        // Unflipped dog: red on the left, blue on the right.
        assert!(px(0, 0, 1, 0) > 0.9 && px(0, 2, 1, 0) < -0.9);
        assert!(px(0, 2, 1, 3) > 0.9 && px(0, 0, 1, 3) < -0.9);
        // Flipped dog: mirrored.
        assert!(px(1, 2, 1, 0) > 0.9 && px(1, 0, 1, 3) > 0.9);
        // The green cat (jpeg: lossy, so a tolerance).
        assert!(px(2, 1, 2, 2) > 0.8 && px(2, 0, 2, 2) < -0.8);
    }

    fn png(path: &Path) {
        image::RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn captions_come_from_metadata_jsonl_or_kohya_sidecars() {
        let root = scratch("imagefolder");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        png(&root.join("a.png"));
        png(&root.join("sub/b.png"));
        std::fs::write(
            root.join(METADATA_FILE),
            "{\"file_name\": \"sub/b.png\", \"text\": \"a  blue\\nsquare\", \"prompt\": \"x\"}\n\n{\"file_name\": \"a.png\", \"text\": \"a red circle\"}\n",
        )
        .unwrap();
        let folder = ImageFolder::open(&root, 4).unwrap();
        assert_eq!(
            folder.captions("text").unwrap(),
            vec!["a red circle", "a blue square"]
        );
        let err = folder.captions("prompt").unwrap_err().to_string();
        assert!(err.contains("line 3: no `prompt` column"), "{err}");

        let root = scratch("kohya");
        png(&root.join("one.png"));
        png(&root.join("two.jpg"));
        std::fs::write(root.join("one.txt"), "1girl, solo\n").unwrap();
        std::fs::write(root.join("two.txt"), "a green triangle").unwrap();
        let folder = ImageFolder::open(&root, 4).unwrap();
        assert_eq!(
            folder.captions("text").unwrap(),
            vec!["1girl, solo", "a green triangle"]
        );
    }

    #[test]
    fn bad_captions_are_one_line_errors_naming_the_file() {
        let root = scratch("badcaptions");
        png(&root.join("one.png"));
        let folder = ImageFolder::open(&root, 4).unwrap();
        let err = folder.captions("text").unwrap_err().to_string();
        assert!(
            err.contains("one.png") && err.contains("no caption: expected one.txt"),
            "{err}"
        );
        std::fs::write(root.join("one.txt"), [0xff, 0xfe, 0x41]).unwrap();
        let err = folder.captions("text").unwrap_err().to_string();
        assert!(
            err.contains("one.txt") && err.contains("not UTF-8"),
            "{err}"
        );
        std::fs::write(root.join("one.txt"), " \n ").unwrap();
        let err = folder.captions("text").unwrap_err().to_string();
        assert!(err.contains("empty caption"), "{err}");
        std::fs::write(
            root.join(METADATA_FILE),
            "{\"file_name\": \"one.png\", \"text\": \"\"}\n",
        )
        .unwrap();
        let err = folder.captions("text").unwrap_err().to_string();
        assert!(err.contains("line 1: empty caption"), "{err}");
        std::fs::write(
            root.join(METADATA_FILE),
            "{\"file_name\": \"gone.png\", \"text\": \"x\"}\n",
        )
        .unwrap();
        let err = folder.captions("text").unwrap_err().to_string();
        assert!(err.contains("gone.png: no such file"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn empty_and_unreadable_folders_are_clear_errors() {
        let root = scratch("empty");
        let err = ImageFolder::open(&root, 8).err().unwrap().to_string();
        assert!(err.contains("no png/jpeg/webp images"), "{err}");
        std::fs::write(root.join("a.png"), b"junk").unwrap();
        std::fs::write(root.join("b.webp"), b"junk").unwrap();
        let err = ImageFolder::open(&root, 8).err().unwrap().to_string();
        assert!(err.contains("none of the 2 image files"), "{err}");
        assert!(err.contains("a.png"), "{err}");
        let err = ImageFolder::open(&root.join("missing"), 8)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--data: not a folder"), "{err}");
    }
}
