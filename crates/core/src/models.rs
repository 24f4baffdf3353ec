//! Which models and providers an org's usage is broken down by, one month at
//! a time: each (model, provider) pair gets a small index the first time the
//! month sees it, up to a cap; past the cap, a pair counts under
//! [`OTHER`]. The cap bounds what one org can make the rollups hold (a
//! gateway sending a new model name per call would otherwise grow them
//! without end).
//!
//! The pairs a month has indexed are what its checkpoints wrote (every
//! indexed pair is counted for the org, so its org row exists): a restart
//! loads them back ([`Models::restore`]) and replays the usage after the
//! checkpoint in the same order as before, so each event lands under the
//! same name again.

use crate::fast::Map;

/// The name usage past the cap counts under, as model and as provider.
pub const OTHER: &str = "other";

/// The index of [`OTHER`].
pub const OTHER_INDEX: u16 = u16::MAX;

/// The most pairs a month may index (the cap's upper bound).
pub const MODELS_MAX: u16 = 10_000;

/// One month's indexed (model, provider) pairs.
#[derive(Debug, Clone, Default)]
pub struct Models {
    /// By index.
    pairs: Vec<(Box<str>, Box<str>)>,
    /// Model name → (provider, index), usually one provider per model.
    by_model: Map<Box<str>, Vec<(Box<str>, u16)>>,
}

impl Models {
    /// The index of (`model`, `provider`): given the first time, while
    /// fewer than `cap` pairs are indexed; [`OTHER_INDEX`] past that.
    #[inline]
    pub fn index(&mut self, model: &str, provider: &str, cap: u16) -> u16 {
        if let Some(providers) = self.by_model.get(model)
            && let Some((_, i)) = providers.iter().find(|(p, _)| &**p == provider)
        {
            return *i;
        }
        let cap = cap.min(MODELS_MAX);
        if self.pairs.len() >= usize::from(cap) || (model == OTHER && provider == OTHER) {
            return OTHER_INDEX;
        }
        let i = u16::try_from(self.pairs.len()).expect("at most MODELS_MAX pairs");
        self.pairs.push((model.into(), provider.into()));
        self.by_model
            .entry(model.into())
            .or_default()
            .push((provider.into(), i));
        i
    }

    /// The (model, provider) of index `i`; [`OTHER`] for any other index.
    pub fn pair(&self, i: u16) -> (&str, &str) {
        match self.pairs.get(usize::from(i)) {
            Some((m, p)) => (m, p),
            None => (OTHER, OTHER),
        }
    }

    /// How many pairs are indexed.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Indexes the pairs a checkpoint wrote for the month (the `other`
    /// bucket excepted), before any usage is applied.
    pub fn restore<'a>(&mut self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
        for (m, p) in pairs {
            let _ = self.index(m, p, MODELS_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_indexed_once_up_to_the_cap_then_counted_as_other() {
        let mut m = Models::default();
        assert_eq!(m.index("gpt-4o", "openai", 2), 0);
        assert_eq!(m.index("gpt-4o", "azure", 2), 1, "another provider");
        assert_eq!(m.index("gpt-4o", "openai", 2), 0);
        assert_eq!(
            m.index("claude", "anthropic", 2),
            OTHER_INDEX,
            "past the cap"
        );
        assert_eq!(m.index("gpt-4o", "azure", 2), 1, "indexed pairs stay");
        assert_eq!(m.pair(1), ("gpt-4o", "azure"));
        assert_eq!(m.pair(OTHER_INDEX), (OTHER, OTHER));
        assert_eq!(m.len(), 2);
        // A restart indexes what was written, whatever the cap is now.
        let mut r = Models::default();
        r.restore([("claude", "anthropic"), ("gpt-4o", "openai"), ("x", "y")]);
        assert_eq!(r.index("x", "y", 1), 2);
        assert_eq!(r.index("new", "p", 1), OTHER_INDEX);
        assert_eq!(r.index(OTHER, OTHER, 100), OTHER_INDEX);
    }
}
