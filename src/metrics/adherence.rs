//! Prompt adherence on `shapes-text`: an attribute classifier (the `shapes` feature network with
//! [`Heads::Attributes`], trained by `fewstep train-features --heads attributes`) reads the
//! [`Facts`] a generated image shows; an image adheres to its prompt when they equal what the
//! prompt states. Scores per attribute (colours, kinds, number of shapes, colour–kind pairs,
//! relation where stated) and for all at once.

use std::path::Path;

use burn::prelude::*;

use crate::data::captions::{Facts, PAIRS, Relation};
use crate::data::shapes;
use crate::error::{Error, Result};
use crate::io;
use crate::models::feature_net::{
    FeatureNet, FeatureNetConfig, Heads, MAX_COUNT, RELATION_CLASSES,
};
use crate::train::clip::TrainedClip;

/// The attribute classifier.
pub struct AttributeClassifier {
    net: FeatureNet,
    pub config: FeatureNetConfig,
}

impl AttributeClassifier {
    /// Loads a `train-features --heads attributes` folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(io::CONFIG_NAME);
        if !config_path.is_file() {
            return Err(Error::file(
                dir,
                "--attributes: no attribute classifier here (expected config.json and diffusion_pytorch_model.safetensors, as written by `fewstep train-features --heads attributes`)",
            ));
        }
        let config = FeatureNetConfig::from_json_str(&io::read_text(&config_path)?)
            .map_err(|e| e.in_file(&config_path))?;
        if config.heads != Heads::Attributes {
            return Err(Error::file(
                &config_path,
                "--attributes: this feature network has the `shapes` label heads, not attribute heads (train one with `fewstep train-features --heads attributes`)",
            ));
        }
        let net = io::load_weights(config.init(device), &dir.join(io::WEIGHTS_NAME))?;
        Ok(AttributeClassifier { net, config })
    }

    pub fn from_net(net: FeatureNet, config: FeatureNetConfig) -> Self {
        AttributeClassifier { net, config }
    }

    /// The facts `images` ([B, 3, S, S] in [−1, 1]) show.
    pub fn facts(&self, images: Tensor<4>) -> Vec<Facts> {
        facts_from_logits(self.net.logits(self.net.features(images)))
    }
}

/// Held-out `shapes-text` prompts and what each states, with the classifier that judges the
/// images generated from them (image i answers prompt i).
pub struct PromptJudge {
    pub classifier: AttributeClassifier,
    pub prompts: Vec<String>,
    pub facts: Vec<Facts>,
    /// A trained `shapes-text` CLIP and its embeddings of the prompts [N, P], for the CLIP score.
    pub clip: Option<(TrainedClip, Tensor<2>)>,
}

impl PromptJudge {
    /// The fixed captions of the first `n` held-out `shapes` images (seed `data_seed`, indices
    /// `EVAL_START ..`: the images of the FID reference set, so prompts and reference describe
    /// the same distribution).
    pub fn shapes_text(classifier: AttributeClassifier, data_seed: u64, n: usize) -> Self {
        let captions: Vec<_> = (0..n as u64)
            .map(|i| crate::data::captions::fixed_caption(data_seed, shapes::EVAL_START + i))
            .collect();
        PromptJudge {
            classifier,
            prompts: captions.iter().map(|c| c.text.clone()).collect(),
            facts: captions.into_iter().map(|c| c.facts).collect(),
            clip: None,
        }
    }

    /// Adds the CLIP score (Hessel et al. 2021's 100·cos, here with the `shapes-text` CLIP).
    pub fn with_clip(mut self, clip: TrainedClip, device: &Device) -> Result<Self> {
        let embeds = clip.text_embeds(&self.prompts, device)?;
        self.clip = Some((clip, embeds));
        Ok(self)
    }

    /// Scores images `first ..` (pixels in [−1, 1]) against their prompts into `into`.
    pub fn score(&self, first: usize, images: Tensor<4>, into: &mut Adherence) {
        if let Some((clip, prompts)) = &self.clip {
            let b = images.dims()[0];
            let cos = (clip.image_embeds(images.clone())
                * prompts
                    .clone()
                    .narrow(0, first, b)
                    .to_device(&images.device()))
            .sum();
            into.clip_cosine_sum += cos.into_scalar::<f32>() as f64;
        }
        for (i, shown) in self.classifier.facts(images).iter().enumerate() {
            into.add(&self.facts[first + i], shown);
        }
    }
}

/// Reads [`Facts`] from attribute logits [B, ATTRIBUTE_LOGITS].
pub fn facts_from_logits(logits: Tensor<2>) -> Vec<Facts> {
    let [b, _] = logits.dims();
    let counts = PAIRS * (MAX_COUNT + 1);
    let host = |t: Tensor<1, Int>| -> Vec<i64> {
        t.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("int tensor")
    };
    let pairs = host(
        logits
            .clone()
            .slice([0..b, 0..counts])
            .reshape([b, PAIRS, MAX_COUNT + 1])
            .argmax(2)
            .reshape([b * PAIRS]),
    );
    let relation = host(
        logits
            .slice([0..b, counts..counts + RELATION_CLASSES])
            .argmax(1)
            .reshape([b]),
    );
    (0..b)
        .map(|i| Facts {
            pairs: std::array::from_fn(|p| pairs[i * PAIRS + p] as u8),
            relation: Relation::from_class(relation[i] as usize),
        })
        .collect()
}

/// Adherence counts over a set of (prompt, image) pairs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Adherence {
    pub images: usize,
    /// The multiset of colours matches.
    pub colours: usize,
    /// The multiset of kinds matches.
    pub kinds: usize,
    /// The number of shapes matches.
    pub count: usize,
    /// Every (colour, kind) pair's count matches (colour bound to kind).
    pub pairs: usize,
    /// Prompts that state a relation, and images that show it.
    pub relation_prompts: usize,
    pub relation: usize,
    /// Pairs and (where stated) relation match: the headline fraction.
    pub all: usize,
    /// Sum over images of the cosine between the image's and its prompt's CLIP embeddings.
    pub clip_cosine_sum: f64,
}

impl Adherence {
    /// Scores one image showing `shown` for a prompt stating `stated`.
    pub fn add(&mut self, stated: &Facts, shown: &Facts) {
        self.images += 1;
        self.colours += (stated.colours() == shown.colours()) as usize;
        self.kinds += (stated.kinds() == shown.kinds()) as usize;
        self.count += (stated.count() == shown.count()) as usize;
        let pairs = stated.pairs == shown.pairs;
        self.pairs += pairs as usize;
        let relation = match stated.relation {
            Some(r) => {
                self.relation_prompts += 1;
                let ok = shown.relation == Some(r);
                self.relation += ok as usize;
                ok
            }
            None => true,
        };
        self.all += (pairs && relation) as usize;
    }

    fn rate(n: usize, of: usize) -> f64 {
        if of == 0 {
            f64::NAN
        } else {
            n as f64 / of as f64
        }
    }

    fn rate_f(sum: f64, of: usize) -> f64 {
        if of == 0 || sum == 0.0 {
            f64::NAN
        } else {
            sum / of as f64
        }
    }

    /// The headline: the fraction of images whose facts all match their prompt.
    pub fn score(&self) -> f64 {
        Self::rate(self.all, self.images)
    }

    /// Fractions per attribute, for reports.
    pub fn rates(&self) -> serde_json::Value {
        serde_json::json!({
            "adherence": self.score(),
            "colours": Self::rate(self.colours, self.images),
            "kinds": Self::rate(self.kinds, self.images),
            "count": Self::rate(self.count, self.images),
            "pairs": Self::rate(self.pairs, self.images),
            "relation": Self::rate(self.relation, self.relation_prompts),
            "relation_prompts": self.relation_prompts,
            "clip_score": 100.0 * Self::rate_f(self.clip_cosine_sum, self.images),
            "images": self.images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adherence_checks_each_attribute_and_the_stated_relation_only() {
        let mut red_circle_above_blue_square = [0u8; PAIRS];
        red_circle_above_blue_square[0] = 1; // circle, red
        red_circle_above_blue_square[8 + 2] = 1; // square, blue
        let stated = Facts {
            pairs: red_circle_above_blue_square,
            relation: Some(Relation::Above),
        };
        let mut a = Adherence::default();
        a.add(&stated, &stated);
        // Swapped colours: colours and kinds match, pairs do not.
        let mut swapped = [0u8; PAIRS];
        swapped[2] = 1;
        swapped[8] = 1;
        a.add(
            &stated,
            &Facts {
                pairs: swapped,
                relation: Some(Relation::Above),
            },
        );
        // Right pairs, wrong relation.
        a.add(
            &stated,
            &Facts {
                pairs: red_circle_above_blue_square,
                relation: Some(Relation::LeftOf),
            },
        );
        // No relation stated: any shown relation is fine.
        a.add(
            &Facts {
                relation: None,
                ..stated.clone()
            },
            &Facts {
                pairs: red_circle_above_blue_square,
                relation: Some(Relation::Below),
            },
        );
        assert_eq!(
            (a.images, a.colours, a.kinds, a.count, a.pairs),
            (4, 4, 4, 4, 3)
        );
        assert_eq!((a.relation_prompts, a.relation, a.all), (3, 2, 2));
        assert_eq!(a.score(), 0.5);
    }

    #[test]
    fn facts_are_read_from_the_argmax_of_each_head() {
        let device = Device::default();
        let n = PAIRS * (MAX_COUNT + 1) + RELATION_CLASSES;
        let mut row = vec![0f32; n];
        for p in 0..PAIRS {
            row[p * (MAX_COUNT + 1)] = 1.0; // count 0 everywhere …
        }
        row[5 * (MAX_COUNT + 1) + 2] = 3.0; // … but two of pair 5
        row[PAIRS * (MAX_COUNT + 1) + 3] = 1.0; // left of
        let facts =
            facts_from_logits(Tensor::<1>::from_floats(row.as_slice(), &device).reshape([1, n]));
        assert_eq!(facts[0].pairs[5], 2);
        assert_eq!(facts[0].count(), 2);
        assert_eq!(facts[0].relation, Some(Relation::LeftOf));
    }
}
