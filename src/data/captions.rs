//! `shapes-text`: captions of `shapes` images made from what each image holds, so that a
//! text-to-image model's prompt adherence can be *measured* (see [`Facts`]).
//!
//! Grammar (every choice drawn from the caller's seeded stream; the image itself is unchanged):
//! - the shapes are named largest first, each as "‹article› ‹colour› ‹kind›" (synonyms: magenta |
//!   purple, cyan | turquoise, circle | disc); equal (colour, kind) pairs are counted ("two red
//!   circles");
//! - two different shapes: with probability 3/4 their relative position is stated ("a red circle
//!   above a blue square", "… to the left of …", by the larger axis of their displacement),
//!   otherwise "… and …" in either order;
//! - three: "X, Y and Z" (or "X and Y" / "three X" when pairs repeat);
//! - wrapped in one of five templates ("…", "a picture of …", "an image of …", "… on a ‹tone›
//!   background", "a picture of … on a ‹tone› background"; tone: dark grey < 0.4 ≤ grey < 0.6 ≤
//!   light grey).
//!
//! A caption's [`Facts`] are what an attribute classifier can check: the count of every
//! (kind, colour) pair — hence colours, kinds and the number of shapes — and, where stated, the
//! relation in a canonical order (the shape with the lower pair index relative to the other), so
//! that "A above B" and "B below A" are one fact.

use super::shapes::{KINDS, PALETTE, Scene, Shape};
use crate::noise::NoiseStream;

/// (kind, colour) pairs: `kind · 8 + colour`.
pub const PAIRS: usize = KINDS.len() * PALETTE.len();

/// Colour words (first: the canonical name).
pub const COLOUR_WORDS: [&[&str]; 8] = [
    &["red"],
    &["green"],
    &["blue"],
    &["yellow"],
    &["magenta", "purple"],
    &["cyan", "turquoise"],
    &["orange"],
    &["black"],
];

/// Kind words, singular and plural.
pub const KIND_WORDS: [&[(&str, &str)]; 3] = [
    &[("circle", "circles"), ("disc", "discs")],
    &[("square", "squares")],
    &[("triangle", "triangles")],
];

const TEMPLATES: [&str; 5] = [
    "{}",
    "a picture of {}",
    "an image of {}",
    "{} on a {bg} background",
    "a picture of {} on a {bg} background",
];

/// Where one shape lies relative to another (image y grows downwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    /// Where `a` lies relative to `b`, by the larger axis of their displacement.
    pub fn between(a: &Shape, b: &Shape) -> Relation {
        let (dx, dy) = (a.cx - b.cx, a.cy - b.cy);
        if dy.abs() > dx.abs() {
            if dy < 0.0 {
                Relation::Above
            } else {
                Relation::Below
            }
        } else if dx < 0.0 {
            Relation::LeftOf
        } else {
            Relation::RightOf
        }
    }

    pub fn inverse(self) -> Relation {
        match self {
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
        }
    }

    pub fn words(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }

    /// Class index of the attribute classifier's relation head (0 is "no relation").
    pub fn class(relation: Option<Relation>) -> usize {
        relation.map_or(0, |r| {
            1 + Self::ALL.iter().position(|&x| x == r).expect("listed")
        })
    }

    pub fn from_class(class: usize) -> Option<Relation> {
        class.checked_sub(1).and_then(|i| Self::ALL.get(i).copied())
    }
}

/// The (kind, colour) pair index of a shape.
pub fn pair_index(kind: usize, colour: usize) -> usize {
    kind * PALETTE.len() + colour
}

/// What a caption states, or what an image shows, in checkable form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Count of each (kind, colour) pair.
    pub pairs: [u8; PAIRS],
    /// For exactly two shapes of different pairs: the lower-pair-index shape relative to the
    /// other (a caption may leave it unstated).
    pub relation: Option<Relation>,
}

impl Facts {
    /// Everything an image shows (its relation whenever it has two different shapes).
    pub fn of_scene(scene: &Scene) -> Facts {
        let mut pairs = [0u8; PAIRS];
        for s in &scene.shapes {
            pairs[pair_index(s.kind, s.colour)] += 1;
        }
        Facts {
            pairs,
            relation: canonical_relation(&scene.shapes),
        }
    }

    pub fn colours(&self) -> [u8; 8] {
        std::array::from_fn(|c| (0..KINDS.len()).map(|k| self.pairs[pair_index(k, c)]).sum())
    }

    pub fn kinds(&self) -> [u8; 3] {
        std::array::from_fn(|k| {
            (0..PALETTE.len())
                .map(|c| self.pairs[pair_index(k, c)])
                .sum()
        })
    }

    pub fn count(&self) -> u8 {
        self.pairs.iter().sum()
    }
}

/// The relation of two shapes of different pairs in canonical order (lower pair index first).
fn canonical_relation(shapes: &[Shape]) -> Option<Relation> {
    let [a, b] = shapes else { return None };
    let (pa, pb) = (pair_index(a.kind, a.colour), pair_index(b.kind, b.colour));
    match pa.cmp(&pb) {
        std::cmp::Ordering::Less => Some(Relation::between(a, b)),
        std::cmp::Ordering::Greater => Some(Relation::between(b, a)),
        std::cmp::Ordering::Equal => None,
    }
}

/// A caption and what it states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    pub text: String,
    pub facts: Facts,
}

fn pick<'a, T>(rng: &mut NoiseStream, options: &'a [T]) -> &'a T {
    &options[rng.below(options.len() as u64) as usize]
}

fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a red circle", "two red circles".
fn phrase(rng: &mut NoiseStream, kind: usize, colour: usize, count: usize) -> String {
    let c = *pick(rng, COLOUR_WORDS[colour]);
    let (one, many) = *pick(rng, KIND_WORDS[kind]);
    match count {
        1 => format!("{} {c} {one}", article(c)),
        2 => format!("two {c} {many}"),
        _ => format!("three {c} {many}"),
    }
}

fn background_words(tone: f32) -> &'static str {
    if tone < 0.4 {
        "dark grey"
    } else if tone < 0.6 {
        "grey"
    } else {
        "light grey"
    }
}

/// A caption of `scene`, its wording drawn from `rng`.
pub fn caption(scene: &Scene, rng: &mut NoiseStream) -> Caption {
    let mut shapes: Vec<&Shape> = scene.shapes.iter().collect();
    shapes.sort_by(|a, b| b.size.total_cmp(&a.size));
    let mut facts = Facts::of_scene(scene);
    // Distinct pairs, largest first, with their counts.
    let mut groups: Vec<(usize, usize, usize)> = Vec::new();
    for s in &shapes {
        match groups.iter_mut().find(|g| (g.0, g.1) == (s.kind, s.colour)) {
            Some(g) => g.2 += 1,
            None => groups.push((s.kind, s.colour, 1)),
        }
    }
    let stated_relation = groups.len() == 2 && shapes.len() == 2 && rng.uniform() < 0.75;
    let body = if stated_relation {
        let (a, b) = (shapes[0], shapes[1]);
        let rel = Relation::between(a, b);
        format!(
            "{} {} {}",
            phrase(rng, a.kind, a.colour, 1),
            rel.words(),
            phrase(rng, b.kind, b.colour, 1)
        )
    } else {
        if groups.len() == 2 && rng.uniform() < 0.5 {
            groups.swap(0, 1);
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|&(k, c, n)| phrase(rng, k, c, n))
            .collect();
        match parts.as_slice() {
            [one] => one.clone(),
            [a, b] => format!("{a} and {b}"),
            [a, b, c] => format!("{a}, {b} and {c}"),
            _ => unreachable!("1 to 3 shapes"),
        }
    };
    if !stated_relation {
        facts.relation = None;
    }
    let template = *pick(rng, &TEMPLATES);
    let text = template
        .replace("{bg}", background_words(scene.background))
        .replace("{}", &body);
    Caption { text, facts }
}

/// The caption of `shapes` image `index` under `seed` used as a prompt in evaluation: its
/// wording fixed by (`seed`, `index`).
pub fn fixed_caption(seed: u64, index: u64) -> Caption {
    let (_, scene) = super::shapes::render_scene(seed, index);
    caption(&scene, &mut caption_stream(seed, index))
}

/// The stream a fixed caption's wording is drawn from (apart from every training stream).
fn caption_stream(seed: u64, index: u64) -> NoiseStream {
    NoiseStream::for_step(seed ^ 0x6361_7074_696f_6e73, index)
}

/// Every word the grammar can produce (the `shapes-text` vocabulary), sorted.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&str> = vec![
        "a",
        "an",
        "two",
        "three",
        "and",
        "above",
        "below",
        "to",
        "the",
        "left",
        "right",
        "of",
        "picture",
        "image",
        "on",
        "dark",
        "light",
        "grey",
        "background",
    ];
    words.extend(COLOUR_WORDS.iter().flat_map(|c| c.iter().copied()));
    words.extend(
        KIND_WORDS
            .iter()
            .flat_map(|k| k.iter().flat_map(|&(a, b)| [a, b])),
    );
    words.push(",");
    words.sort_unstable();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shapes::render_scene;

    #[test]
    fn captions_state_what_the_image_holds_in_grammar_words() {
        let vocab = vocabulary();
        let mut stated = 0;
        for i in 0..400 {
            let (_, scene) = render_scene(0, i);
            let cap = caption(&scene, &mut NoiseStream::new(i));
            let facts = Facts::of_scene(&scene);
            assert_eq!(cap.facts.pairs, facts.pairs, "{}", cap.text);
            if let Some(r) = cap.facts.relation {
                stated += 1;
                assert_eq!(Some(r), facts.relation);
                assert!(cap.text.contains(r.words()) || cap.text.contains(r.inverse().words()));
            }
            for word in cap.text.replace(',', " ,").split_whitespace() {
                assert!(vocab.contains(&word), "{word} in {}", cap.text);
            }
            let n = scene.shapes.len();
            assert_eq!(cap.facts.count() as usize, n);
        }
        assert!(stated > 40, "{stated}");
    }

    #[test]
    fn relations_are_canonical_and_invertible() {
        let shape = |kind, colour, cx, cy| Shape {
            kind,
            colour,
            size: 8.0,
            cx,
            cy,
            theta: 0.0,
        };
        let red_circle_top = shape(0, 0, 16.0, 4.0);
        let blue_square_bottom = shape(1, 2, 15.0, 28.0);
        assert_eq!(
            Relation::between(&red_circle_top, &blue_square_bottom),
            Relation::Above
        );
        let scene = |shapes| Scene {
            background: 0.5,
            shapes,
        };
        let a = Facts::of_scene(&scene(vec![
            red_circle_top.clone(),
            blue_square_bottom.clone(),
        ]));
        let b = Facts::of_scene(&scene(vec![blue_square_bottom, red_circle_top]));
        assert_eq!(a, b);
        assert_eq!(a.relation, Some(Relation::Above));
        for r in Relation::ALL {
            assert_eq!(Relation::from_class(Relation::class(Some(r))), Some(r));
            assert_eq!(r.inverse().inverse(), r);
        }
        assert_eq!(Relation::from_class(Relation::class(None)), None);
    }

    #[test]
    fn fixed_captions_are_pure_and_worded_variously() {
        assert_eq!(fixed_caption(0, 5), fixed_caption(0, 5));
        let texts: std::collections::HashSet<String> =
            (0..50).map(|i| fixed_caption(0, i).text).collect();
        assert!(texts.len() > 40);
        assert!(texts.iter().any(|t| t.contains("background")));
        assert!(texts.iter().any(|t| t.starts_with("an image of")));
    }
}
