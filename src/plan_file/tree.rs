//! Builds `marked-yaml`'s positioned tree from `yaml-rust2`'s parser events: the tree and the
//! errors `marked_yaml::parse_yaml_with_options` gives (duplicate keys refused, no anchors,
//! aliases or tags, scalars marked plain or quoted, a mapping at the top), except that a
//! [`StepListener`] can take each item of the top-level `steps` list as soon as it is complete.
//! The validator checks the step and drops its nodes, so a plan's tree is never held whole:
//! 2000 domains x 2 steps made a 10.6 MB tree for 264 KB of YAML, memory the process first had
//! to fault in (in this test rig's virtual machine 0.06-2.3 ms per MiB, as the host pleases).

use hashlink::LinkedHashMap;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoadError, Marker, Node, Span};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker as YamlMarker, TScalarStyle};

/// Takes the items of the top-level `steps` list while the tree is built.
pub trait StepListener {
    /// `steps` starts; `before` holds the plan's entries written above it.
    fn steps_start(&mut self, before: &MarkedMappingNode);
    /// The next item of `steps`, complete. It is not put in the tree: the list there stays
    /// empty.
    fn step(&mut self, item: Node);
}

/// Parses `text` into a positioned tree whose top level is a mapping; `listener` takes the
/// items of the top-level `steps` list.
///
/// # Errors
/// The first problem `marked-yaml` would report: a scanner error anywhere in the text, else the
/// first anchor, alias, tag, non-scalar key, duplicate key or top level that is not a mapping.
pub fn parse(text: &str, listener: Option<&mut dyn StepListener>) -> Result<Node, LoadError> {
    let mut builder = Builder {
        open: Vec::new(),
        done: None,
        error: None,
        listener,
    };
    Parser::new_from_str(text)
        .load(&mut builder, false)
        .map_err(|e| LoadError::ScanError(marker(*e.marker()), e))?;
    match (builder.error, builder.done) {
        (Some(error), _) => Err(error),
        (None, Some(root)) => Ok(root),
        // The parser ends every stream, so this is not reached.
        (None, None) => Err(LoadError::TopLevelMustBeMapping(Marker::new(0, 0, 1, 1))),
    }
}

/// A mapping or list being built.
enum Open {
    Mapping {
        start: Marker,
        entries: LinkedHashMap<MarkedScalarNode, Node>,
        /// The key whose value comes next.
        key: Option<MarkedScalarNode>,
    },
    List {
        start: Marker,
        items: Vec<Node>,
        /// The top-level `steps` list, whose items go to the listener.
        steps: bool,
    },
}

struct Builder<'l> {
    open: Vec<Open>,
    done: Option<Node>,
    /// The first error; the parser still runs to the end, as a scanner error takes precedence.
    error: Option<LoadError>,
    listener: Option<&'l mut dyn StepListener>,
}

/// `marked-yaml`'s marker for a `yaml-rust2` one (source 0; columns counted from 1).
fn marker(mark: YamlMarker) -> Marker {
    Marker::new(0, mark.index(), mark.line(), mark.col() + 1)
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, event: Event, mark: YamlMarker) {
        if self.error.is_some() || self.done.is_some() {
            return;
        }
        let mark = marker(mark);
        let outcome = match event {
            Event::MappingStart(anchor, tag) => self.open(mark, anchor, tag.is_some(), true),
            Event::SequenceStart(anchor, tag) => self.open(mark, anchor, tag.is_some(), false),
            Event::MappingEnd | Event::SequenceEnd => self.close(mark),
            Event::Scalar(value, style, anchor, tag) => {
                if anchor != 0 {
                    Err(LoadError::UnexpectedAnchor(mark))
                } else if tag.is_some() {
                    Err(LoadError::UnexpectedTag(mark))
                } else {
                    let mut scalar = MarkedScalarNode::new(Span::new_start(mark), value);
                    scalar.set_coerce(matches!(style, TScalarStyle::Plain));
                    self.scalar(mark, scalar)
                }
            }
            // An alias needs an anchor, which was refused where it was defined.
            Event::Alias(_) => Err(LoadError::UnexpectedAnchor(mark)),
            // A stream without a document (only comments) is an empty mapping.
            Event::StreamEnd if self.open.is_empty() => {
                let empty = MarkedMappingNode::new_empty(Span::new_with_marks(mark, mark));
                self.done = Some(Node::from(empty));
                Ok(())
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => Ok(()),
        };
        if let Err(error) = outcome {
            self.error = Some(error);
        }
    }
}

impl Builder<'_> {
    fn open(
        &mut self,
        mark: Marker,
        anchor: usize,
        tagged: bool,
        mapping: bool,
    ) -> Result<(), LoadError> {
        if tagged {
            return Err(LoadError::UnexpectedTag(mark));
        }
        if anchor != 0 {
            return Err(LoadError::UnexpectedAnchor(mark));
        }
        let mut steps = false;
        match self.open.last() {
            None if !mapping => return Err(LoadError::TopLevelMustBeMapping(mark)),
            Some(Open::Mapping { key: None, .. }) => {
                return Err(LoadError::MappingKeyMustBeScalar(mark))
            }
            Some(Open::Mapping {
                start,
                entries,
                key: Some(key),
            }) if self.open.len() == 1 && !mapping && key.as_str() == "steps" => {
                steps = true;
                if let Some(listener) = self.listener.as_deref_mut() {
                    let before =
                        MarkedMappingNode::new(Span::new_with_marks(*start, mark), entries.clone());
                    listener.steps_start(&before);
                }
            }
            _ => {}
        }
        self.open.push(if mapping {
            Open::Mapping {
                start: mark,
                entries: LinkedHashMap::new(),
                key: None,
            }
        } else {
            Open::List {
                start: mark,
                items: Vec::new(),
                steps,
            }
        });
        Ok(())
    }

    fn close(&mut self, mark: Marker) -> Result<(), LoadError> {
        let node = match self.open.pop() {
            Some(Open::Mapping { start, entries, .. }) => Node::from(MarkedMappingNode::new(
                Span::new_with_marks(start, mark),
                entries,
            )),
            Some(Open::List { start, items, .. }) => Node::from(MarkedSequenceNode::new(
                Span::new_with_marks(start, mark),
                items,
            )),
            // The parser closes only what it opened.
            None => return Ok(()),
        };
        self.place(node)
    }

    fn scalar(&mut self, mark: Marker, scalar: MarkedScalarNode) -> Result<(), LoadError> {
        match self.open.last_mut() {
            None => Err(LoadError::TopLevelMustBeMapping(mark)),
            Some(Open::Mapping {
                key: key @ None, ..
            }) => {
                *key = Some(scalar);
                Ok(())
            }
            Some(_) => self.place(Node::from(scalar)),
        }
    }

    /// Puts a complete value where it belongs: under its key, at the end of its list, or at
    /// the top.
    fn place(&mut self, node: Node) -> Result<(), LoadError> {
        match self.open.last_mut() {
            None => self.done = Some(node),
            Some(Open::Mapping { entries, key, .. }) => {
                let Some(key) = key.take() else {
                    // A mapping or list where a key belongs was refused when it opened.
                    return Ok(());
                };
                if let Some((first, _)) = entries.get_key_value(&key) {
                    return Err(LoadError::DuplicateKey(Box::new(
                        marked_yaml::loader::DuplicateKeyInner {
                            prev_key: first.clone(),
                            key,
                        },
                    )));
                }
                entries.insert(key, node);
            }
            Some(Open::List { items, steps, .. }) => match self.listener.as_deref_mut() {
                Some(listener) if *steps => listener.step(node),
                _ => items.push(node),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `marked-yaml` makes of `text`, with the options plans are read with.
    fn marked(text: &str) -> String {
        let options = marked_yaml::LoaderOptions::default()
            .error_on_duplicate_keys(true)
            .prevent_coercion(true);
        format!(
            "{:?}",
            marked_yaml::parse_yaml_with_options(0, text, options)
        )
    }

    /// What [`parse`] makes of it.
    fn ours(text: &str) -> String {
        format!("{:?}", parse(text, None))
    }

    /// Every plan of the repository (examples and the invalid corpus) and forms that plans
    /// must not use.
    fn texts() -> Vec<(String, String)> {
        let mut texts: Vec<(String, String)> = [
            "",
            "# only a comment\n",
            "---\n",
            "version: 1\n",
            "- a\n- b\n",
            "just text\n",
            "a: 1\na: 2\n",
            "a: {b: 1, b: 2}\n",
            "a: [1, 2]\na: x\n",
            "steps:\n  - {vm: a}\n  - vm: b\n    vm: c\n",
            "a: &x 1\nb: *x\n",
            "a: &x {b: 1}\n",
            "a: &x [1]\n",
            "a: !!str 1\n",
            "a: !custom {b: 1}\n",
            "a: !t [1]\n",
            "? [a, b]\n: 1\n",
            "? {a: 1}\n: 1\n",
            "{[a]: 1}\n",
            "a: 'quoted'\nb: \"double\"\nc: plain\nd: |\n  block\ne: >\n  folded\n",
            "a:\n\tb: 1\n",
            "a: [1, 2\n",
            "a: 1\n b: 2\n",
            "a: x\n---\nb: y\n",
            "steps: []\nsteps: []\n",
            "a: ~\nb: null\nc:\nd: ''\n",
            "a: [{b: [c, {d: e}]}, [f, [g]]]\n",
            "a: 1 # comment\n# end\n",
            "\u{feff}a: 1\n",
        ]
        .iter()
        .map(|t| (format!("{t:?}"), (*t).to_owned()))
        .collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut folders = vec![root.join("examples"), root.join("tests/corpus")];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    folders.push(path);
                } else if path.extension().is_some_and(|e| e == "yaml") {
                    let text = std::fs::read(&path).unwrap();
                    texts.push((
                        path.display().to_string(),
                        String::from_utf8_lossy(&text).into_owned(),
                    ));
                }
            }
        }
        texts
    }

    #[test]
    fn every_plan_reads_as_marked_yaml_reads_it() {
        let texts = texts();
        assert!(texts.len() > 100, "only {} texts", texts.len());
        let mut refused = 0;
        for (name, text) in &texts {
            let expected = marked(text);
            refused += usize::from(expected.starts_with("Err"));
            assert_eq!(ours(text), expected, "{name}");
        }
        // Both kinds were compared: trees and errors.
        assert!(
            refused > 15 && refused < texts.len() - 15,
            "{refused} refused"
        );
    }

    /// A plan of many steps, with an error near its end: the same tree, or the same first
    /// error.
    #[test]
    fn a_large_plan_reads_the_same_and_fails_at_the_same_place() {
        let steps = (0..2000)
            .map(|i| format!("  - {{at: 2030-01-01 04:00, vm: 'web-{i}', memory: 1GiB, description: \"d\"}}\n"))
            .collect::<Vec<_>>()
            .concat();
        let text = format!("version: 1\ntimezone: UTC\nsteps:\n{steps}");
        assert_eq!(ours(&text), marked(&text));
        assert!(marked(&text).starts_with("Ok"));
        for broken in ["  - {vm: a, vm: b}\n", "  - &x {vm: a}\n", "  - {vm: [a\n"] {
            let text = format!("{text}{broken}");
            assert!(marked(&text).starts_with("Err"), "{broken}");
            assert_eq!(ours(&text), marked(&text), "{broken}");
        }
    }

    /// Steps a plan might hold, and forms it must not.
    const ITEMS: &[&str] = &[
        "  - {vm: a, memory: 1GiB}\n",
        "  - vm: b\n    power: shutoff\n",
        "  - &x {vm: c}\n",
        "  - *x\n",
        "  - !tag {vm: d}\n",
        "  - {vm: !!str e}\n",
        "  - {vm: e, vm: f}\n",
        "  - [g, h]\n",
        "  - 'quoted'\n",
        "  - {vm: [a, {b: c}]}\n",
        "  - {[k]: v}\n",
        "  - {vm: [unclosed}\n",
    ];

    /// Top-level entries, written above or below `steps`.
    const ENTRIES: &[&str] = &[
        "version: 1\n",
        "name: x\n",
        "name: y\n",
        "window: {start: 04:00, end: 05:00}\n",
        "&t top: 1\n",
        "tagged: !t 2\n",
        "description: |\n  block\n",
        "# comment\n",
        "\n",
    ];

    /// A plan of `items` with `entries` above and below its steps, or a top level that is not
    /// a mapping.
    fn document(above: &[usize], items: &[usize], below: &[usize], top: u8) -> String {
        let pick = |list: &[&str], at: &[usize]| at.iter().map(|&i| list[i]).collect::<String>();
        match top {
            0 => "- a list\n".to_owned(),
            1 => "just text\n".to_owned(),
            _ => format!(
                "{}steps:\n{}{}",
                pick(ENTRIES, above),
                pick(ITEMS, items),
                pick(ENTRIES, below)
            ),
        }
    }

    fn documents() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::collection::vec;
        use proptest::strategy::Strategy;
        (
            vec(0..ENTRIES.len(), 0..4),
            vec(0..ITEMS.len(), 0..6),
            vec(0..ENTRIES.len(), 0..3),
            0..12_u8,
        )
            .prop_map(|(above, items, below, top)| document(&above, &items, &below, top))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, failure_persistence: None, ..Default::default() })]

        #[test]
        fn plan_like_documents_read_as_marked_yaml_reads_them(text in documents()) {
            proptest::prop_assert_eq!(ours(&text), marked(&text), "{:?}", text);
        }
    }

    /// The property above is not vacuous: of 512 documents drawn as it draws them, 52 give a
    /// tree and the others every kind of error (from 21 to 144 of each).
    #[test]
    fn plan_like_documents_give_trees_and_every_kind_of_error() {
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut kinds = std::collections::BTreeMap::new();
        for _ in 0..512 {
            let text = documents().new_tree(&mut runner).unwrap().current();
            let kind = marked(&text)
                .split(['(', ' '])
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            *kinds.entry(kind).or_insert(0) += 1;
        }
        for kind in [
            "Ok Mapping",
            "Err ScanError",
            "Err DuplicateKey",
            "Err UnexpectedAnchor",
            "Err UnexpectedTag",
            "Err TopLevelMustBeMapping",
            "Err MappingKeyMustBeScalar",
        ] {
            assert!(
                kinds.get(kind).copied().unwrap_or(0) >= 5,
                "{kind}: {kinds:?}"
            );
        }
    }

    #[derive(Default)]
    struct Taken {
        before: Vec<String>,
        steps: Vec<Node>,
    }

    impl StepListener for Taken {
        fn steps_start(&mut self, before: &MarkedMappingNode) {
            self.before = before.keys().map(|k| k.as_str().to_owned()).collect();
            self.steps.clear();
        }

        fn step(&mut self, item: Node) {
            self.steps.push(item);
        }
    }

    #[test]
    fn the_listener_takes_the_top_level_steps_in_order_with_what_came_before() {
        let text = "version: 1\ntimezone: UTC\nother: {steps: [{vm: x}]}\nsteps:\n  - vm: a\n  - {vm: b, nested: {steps: [{vm: y}]}}\n  - [c]\nafter: 1\n";
        let mut taken = Taken::default();
        let root = parse(text, Some(&mut taken)).unwrap();
        assert_eq!(taken.before, ["version", "timezone", "other"]);
        // Each item as the whole tree has it; none of them left in the tree.
        let whole = parse(text, None).unwrap();
        let whole = whole.as_mapping().unwrap();
        let items = whole.get_sequence("steps").unwrap();
        assert_eq!(format!("{:?}", taken.steps), format!("{:?}", **items));
        let root = root.as_mapping().unwrap();
        assert!(root.get_sequence("steps").unwrap().is_empty());
        assert_eq!(
            format!("{:?}", root.get_node("other")),
            format!("{:?}", whole.get_node("other"))
        );
    }
}
