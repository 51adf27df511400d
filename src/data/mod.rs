//! Training data: the procedural `shapes` default, image folders, and batching.

pub mod captions;
pub mod folder;
pub mod shapes;

use std::path::PathBuf;

use burn::prelude::*;

use crate::error::Result;
use crate::noise::NoiseStream;
pub use folder::ImageFolder;

/// Where training images come from (stored in a run's `run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DataSource {
    /// The procedural `shapes` dataset under a seed.
    Shapes { seed: u64 },
    /// A folder of png/jpeg/webp images (sub-folders are classes).
    Folder { path: PathBuf },
}

impl DataSource {
    /// The source a `--data` flag names: `shapes` (under `seed`) or a folder, made absolute so a
    /// stored run resumes from any directory.
    pub fn from_flag(value: &str, seed: u64) -> crate::error::Result<Self> {
        // `shapes-text` is the same images; a text-conditioned model reads their captions.
        if value == "shapes" || value == "shapes-text" {
            return Ok(DataSource::Shapes { seed });
        }
        let path = std::path::Path::new(value);
        let not_found = || {
            crate::error::Error::file(
                path,
                "--data: not found (expected `shapes`, `shapes-text` or a folder of png/jpeg/webp images)",
            )
        };
        if !path.is_dir() {
            return Err(not_found());
        }
        Ok(DataSource::Folder {
            path: path.canonicalize().map_err(|_| not_found())?,
        })
    }

    /// Opens the source at `size × size` (decoding a folder once).
    pub fn open(&self, size: usize) -> Result<TrainImages> {
        match self {
            DataSource::Shapes { seed } => Ok(TrainImages::Shapes { seed: *seed }),
            DataSource::Folder { path } => Ok(TrainImages::Folder(ImageFolder::open(path, size)?)),
        }
    }
}

/// An opened data source that draws random training batches.
pub enum TrainImages {
    Shapes { seed: u64 },
    Folder(ImageFolder),
}

impl TrainImages {
    /// `b` random training images drawn with `rng`: ([B, 3, S, S] in [−1, 1], class labels [B]).
    /// `shapes` draws from its training index range; folders draw uniformly with replacement and
    /// flip half the images left-right.
    pub fn random_batch(
        &self,
        rng: &mut NoiseStream,
        b: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<1, Int>) {
        let (x, labels, _) = self.random_rows(rng, b, device);
        (x, labels)
    }

    /// [`random_batch`](Self::random_batch) with the rows drawn (`shapes` indices, folder
    /// positions), for their captions.
    pub fn random_rows(
        &self,
        rng: &mut NoiseStream,
        b: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<1, Int>, Vec<u64>) {
        match self {
            TrainImages::Shapes { seed } => {
                let indices: Vec<u64> = (0..b).map(|_| rng.below(shapes::EVAL_START)).collect();
                let (x, y) = shapes_batch(*seed, &indices, device);
                (x, y, indices)
            }
            TrainImages::Folder(folder) => {
                let indices: Vec<usize> = (0..b)
                    .map(|_| rng.below(folder.len() as u64) as usize)
                    .collect();
                let flips: Vec<bool> = (0..b).map(|_| rng.uniform() < 0.5).collect();
                let (x, y) = folder.batch(&indices, &flips, device);
                (x, y, indices.iter().map(|&i| i as u64).collect())
            }
        }
    }
}

/// The captions of a text-to-image model's training images: `shapes-text` (worded afresh at
/// every draw) or a captioned folder's (metadata.jsonl / kohya sidecars).
pub enum Captions {
    ShapesText { seed: u64 },
    Folder(Vec<String>),
}

impl Captions {
    /// The captions of `images` (a folder's read with `column`).
    pub fn open(images: &TrainImages, column: &str) -> Result<Self> {
        Ok(match images {
            TrainImages::Shapes { seed } => Captions::ShapesText { seed: *seed },
            TrainImages::Folder(folder) => Captions::Folder(folder.captions(column)?),
        })
    }

    /// The captions of `rows`, with the given `dropout` probability of the empty caption
    /// (classifier-free guidance's unconditional half); wording and dropout drawn from `rng`.
    pub fn for_rows(&self, rows: &[u64], dropout: f32, rng: &mut NoiseStream) -> Vec<String> {
        rows.iter()
            .map(|&row| {
                let text = match self {
                    Captions::ShapesText { seed } => {
                        let (_, scene) = shapes::render_scene(*seed, row);
                        captions::caption(&scene, rng).text
                    }
                    Captions::Folder(all) => all[row as usize].clone(),
                };
                if rng.uniform() < dropout as f64 {
                    String::new()
                } else {
                    text
                }
            })
            .collect()
    }
}

/// A batch of `shapes` images (indices `indices` under `seed`): ([B, 3, 32, 32] in [−1, 1],
/// largest-shape class labels [B]).
pub fn shapes_batch(seed: u64, indices: &[u64], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let (x, labels) = shapes_labelled_batch(seed, indices, device);
    let kinds: Vec<i64> = labels.iter().map(|l| l.largest_kind as i64).collect();
    (x, Tensor::<1, Int>::from_ints(kinds.as_slice(), device))
}

/// A batch of `shapes` images with every label. Rendering runs in parallel.
pub fn shapes_labelled_batch(
    seed: u64,
    indices: &[u64],
    device: &Device,
) -> (Tensor<4>, Vec<shapes::ShapeLabels>) {
    let (x, scenes) = shapes_scene_batch(seed, indices, device);
    (x, scenes.iter().map(shapes::Scene::labels).collect())
}

/// A batch of `shapes` images with what each holds. Rendering runs in parallel.
pub fn shapes_scene_batch(
    seed: u64,
    indices: &[u64],
    device: &Device,
) -> (Tensor<4>, Vec<shapes::Scene>) {
    use rayon::prelude::*;
    let rendered: Vec<(Vec<f32>, shapes::Scene)> = indices
        .par_iter()
        .map(|&i| shapes::render_scene(seed, i))
        .collect();
    let b = indices.len();
    let pixels: Vec<f32> = rendered
        .iter()
        .flat_map(|(p, _)| p.iter().copied())
        .collect();
    let x = Tensor::<1>::from_floats(pixels.as_slice(), device).reshape([
        b,
        3,
        shapes::SIZE,
        shapes::SIZE,
    ]);
    (x, rendered.into_iter().map(|(_, l)| l).collect())
}
