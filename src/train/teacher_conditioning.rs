//! What a distillation batch conditions the teacher (and student) on: nothing, the class labels of
//! a class-conditional teacher, or the caption embeddings of a text-to-image teacher; and the
//! unconditional counterpart classifier-free guidance needs (the null class, the empty prompt's
//! embedding, as diffusers' pipelines encode `""`).

use burn::prelude::*;

use super::data_parallel::Shard;
use crate::data::{Captions, TrainImages};
use crate::error::{Error, Result};
use crate::models::Conditioning;
use crate::noise::NoiseStream;
use crate::pipeline::Pipeline;

/// The caption column a folder's metadata.jsonl is read with in distillation.
pub const CAPTION_COLUMN: &str = "text";

pub(crate) enum TeacherConditioning {
    None,
    /// A class-conditional teacher; the last class is the null label.
    Labels {
        null: i64,
    },
    /// A text-to-image teacher.
    Text(Box<TextSide>),
}

/// The training images' captions and the empty prompt's embedding [1, N, D].
pub(crate) struct TextSide {
    captions: Captions,
    empty: Tensor<3>,
}

impl TeacherConditioning {
    pub fn new(teacher: &Pipeline, images: &TrainImages, device: &Device) -> Result<Self> {
        if let Some(text) = &teacher.text {
            return Ok(TeacherConditioning::Text(Box::new(TextSide {
                captions: Captions::open(images, CAPTION_COLUMN)?,
                empty: text.encode(&[String::new()], 0, device)?,
            })));
        }
        Ok(match teacher.unet.num_classes() {
            Some(k) => TeacherConditioning::Labels { null: k as i64 - 1 },
            None => TeacherConditioning::None,
        })
    }

    /// Whether classifier-free guidance has an unconditional pass here.
    pub fn guidable(&self) -> bool {
        !matches!(self, TeacherConditioning::None)
    }

    /// The conditioning of a batch: its `labels`, or the captions of `rows` (worded from `rng`)
    /// embedded by the teacher's text encoder.
    pub fn batch(
        &self,
        teacher: &Pipeline,
        labels: Tensor<1, Int>,
        rows: &[u64],
        rng: &mut NoiseStream,
        device: &Device,
    ) -> Result<Conditioning> {
        Ok(match self {
            TeacherConditioning::None => Conditioning::none(),
            TeacherConditioning::Labels { .. } => Conditioning::labels(Some(labels)),
            TeacherConditioning::Text(side) => {
                let texts = side.captions.for_rows(rows, 0.0, rng);
                let text = teacher
                    .text
                    .as_ref()
                    .ok_or_else(|| Error::Config("the teacher lost its text encoder".into()))?;
                Conditioning::text(text.encode(&texts, 0, device)?)
            }
        })
    }

    /// The unconditional conditioning of `b` rows on `device` (None without guidance).
    pub fn uncond(&self, b: usize, device: &Device) -> Option<Conditioning> {
        match self {
            TeacherConditioning::None => None,
            TeacherConditioning::Labels { null } => {
                Some(Conditioning::labels(Some(Tensor::<1, Int>::full(
                    [b],
                    *null,
                    device,
                ))))
            }
            TeacherConditioning::Text(side) => {
                let [_, n, d] = side.empty.dims();
                Some(Conditioning::text(
                    side.empty.clone().to_device(device).expand([b, n, d]),
                ))
            }
        }
    }
}

impl Shard<'_> {
    /// This shard's rows of a batch's conditioning (no autodiff).
    pub fn take_conditioning(&self, cond: &Conditioning) -> Conditioning {
        Conditioning {
            labels: cond.labels.as_ref().map(|t| self.take(t)),
            guidance: cond.guidance.as_ref().map(|t| self.take(t)),
            context: cond.context.as_ref().map(|t| self.take(t)),
            context_mask: cond.context_mask.as_ref().map(|t| self.take(t)),
        }
    }
}
