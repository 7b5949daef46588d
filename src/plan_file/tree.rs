//! Builds `marked-yaml`'s positioned tree from `yaml-rust2`'s parser events, the tree and the
//! errors `marked_yaml::parse_yaml_with_options` gives (duplicate keys refused, no anchors,
//! aliases or tags, scalars marked plain or quoted, a mapping at the top), with two additions:
//!
//! - a [`StepListener`] hears each item of the top-level `steps` list as soon as it is complete,
//!   so the validator checks steps while the rest of the file is still being parsed;
//! - a large plan is parsed on a thread of its own, the tree built (and its steps checked) on the
//!   caller's: parsing is the larger part of loading a plan (2000 domains x 2 steps: 5.4 ms of
//!   `marked-yaml`'s 7.3 ms, checking the steps 1.7 ms more), and a second core takes the rest.

use std::sync::mpsc;

use hashlink::LinkedHashMap;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoadError, Marker, Node, Span};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker as YamlMarker, ScanError, TScalarStyle};

/// Hears the top-level `steps` list while the tree is built.
pub trait StepListener {
    /// `steps` starts; `before` holds the plan's entries written above it.
    fn steps_start(&mut self, before: &MarkedMappingNode);
    /// The next item of `steps`, complete.
    fn step(&mut self, item: &Node);
}

/// Texts shorter than this are parsed on the caller's thread: a thread and its channel cost
/// more than they save on a plan of a few dozen steps.
const THREAD_FROM_BYTES: usize = 32 * 1024;

/// Events handed from the parser's thread to the builder at a time.
const BATCH: usize = 256;

/// A parsed plan: the tree, which goes back to the thread that parsed it to be freed. Its
/// strings were allocated there, and the allocator frees a block fastest on its own thread
/// (2000 domains: about 4 ms from this thread, after that thread has ended).
pub struct Tree {
    root: Node,
    home: Option<mpsc::Sender<Node>>,
}

impl std::ops::Deref for Tree {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.root
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            let blank = Node::from(MarkedScalarNode::new_empty(Span::new_blank()));
            // If that thread is gone, the tree comes back in the error and is freed here.
            drop(home.send(std::mem::replace(&mut self.root, blank)));
        }
    }
}

/// Parses `text` into a positioned tree whose top level is a mapping; `listener` hears the
/// top-level `steps` list as it is built.
///
/// # Errors
/// The first problem `marked-yaml` would report: a scanner error anywhere in the text, else the
/// first anchor, alias, tag, non-scalar key, duplicate key or top level that is not a mapping.
pub fn parse(text: &str, listener: Option<&mut dyn StepListener>) -> Result<Tree, LoadError> {
    parse_on(text, listener, text.len() >= THREAD_FROM_BYTES)
}

/// [`parse`], with the parser on a thread of its own when `beside` (and a thread starts).
fn parse_on(
    text: &str,
    listener: Option<&mut dyn StepListener>,
    beside: bool,
) -> Result<Tree, LoadError> {
    let mut builder = Builder {
        open: Vec::new(),
        done: None,
        error: None,
        listener,
    };
    let beside = if beside { Parsing::start(text) } else { None };
    let (scanned, home) = match beside {
        Some(parsing) => parsing.feed(&mut builder),
        None => (Parser::new_from_str(text).load(&mut builder, false), None),
    };
    scanned.map_err(|e| LoadError::ScanError(marker(*e.marker()), e))?;
    match (builder.error, builder.done) {
        (Some(error), _) => Err(error),
        (None, Some(root)) => Ok(Tree { root, home }),
        // The parser ends every stream, so this is not reached.
        (None, None) => Err(LoadError::TopLevelMustBeMapping(Marker::new(0, 0, 1, 1))),
    }
}

type Batch = Vec<(Event, YamlMarker)>;

/// What the parser's thread sends: events, then how parsing ended.
enum Message {
    Events(Batch),
    Ended(Result<(), ScanError>),
}

/// Batches in flight from the parser to the builder.
const BATCHES: usize = 8;

/// A parser running on a thread of its own over a copy of the text. After parsing, the thread
/// waits for the tree to free it (see [`Tree`]).
struct Parsing {
    messages: mpsc::Receiver<Message>,
    /// Emptied batches go back to the parser: fresh ones, a few megabytes over a large plan,
    /// cost more in page faults than the parsing they carry.
    give_back: mpsc::SyncSender<Batch>,
    home: mpsc::Sender<Node>,
    thread: std::thread::JoinHandle<()>,
}

impl Parsing {
    /// `None` when no thread can be started (the caller parses on its own).
    fn start(text: &str) -> Option<Self> {
        let (sender, messages) = mpsc::sync_channel(BATCHES);
        let (give_back, emptied) = mpsc::sync_channel(BATCHES + 2);
        let (home, trees) = mpsc::channel::<Node>();
        let text = text.to_owned();
        let thread = std::thread::Builder::new()
            .name("yaml parser".to_owned())
            .spawn(move || {
                let mut batcher = Batcher {
                    batch: Vec::with_capacity(BATCH),
                    sender,
                    emptied,
                };
                let scanned = Parser::new_from_str(&text).load(&mut batcher, false);
                batcher.flush();
                // The builder is gone only if it stopped early; nothing then waits for this.
                let _ = batcher.sender.send(Message::Ended(scanned));
                drop(batcher);
                // Freed here, where it was allocated (the sender's end closes the channel
                // when no tree comes).
                drop(trees.recv());
            })
            .ok()?;
        Some(Self {
            messages,
            give_back,
            home,
            thread,
        })
    }

    /// Hands every event to `builder`; how parsing ended, and where the tree goes to be freed.
    fn feed(
        self,
        builder: &mut Builder<'_>,
    ) -> (Result<(), ScanError>, Option<mpsc::Sender<Node>>) {
        for message in &self.messages {
            match message {
                Message::Events(mut batch) => {
                    for (event, mark) in batch.drain(..) {
                        builder.on_event(event, mark);
                    }
                    // The parser may be done with batches: then this one is not needed.
                    let _ = self.give_back.try_send(batch);
                }
                Message::Ended(scanned) => return (scanned, Some(self.home)),
            }
        }
        // The parser's thread ended without saying how: it panicked. The panic is this
        // thread's, as it would have been parsing here.
        match self.thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => (Ok(()), None),
        }
    }
}

/// The parser's side of [`Parsing`].
struct Batcher {
    batch: Batch,
    sender: mpsc::SyncSender<Message>,
    emptied: mpsc::Receiver<Batch>,
}

impl Batcher {
    fn flush(&mut self) {
        let next = self
            .emptied
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH));
        let batch = std::mem::replace(&mut self.batch, next);
        // The builder only goes away after the parser is done, so a send cannot fail.
        let _ = self.sender.send(Message::Events(batch));
    }
}

impl MarkedEventReceiver for Batcher {
    fn on_event(&mut self, event: Event, mark: YamlMarker) {
        self.batch.push((event, mark));
        if self.batch.len() == BATCH {
            self.flush();
        }
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
        /// The top-level `steps` list, whose items the listener hears.
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
                    let before = MarkedMappingNode::new(
                        Span::new_with_marks(*start, mark),
                        entries.clone(),
                    );
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
            Some(Open::Mapping { key: key @ None, .. }) => {
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
            Some(Open::List { items, steps, .. }) => {
                items.push(node);
                if *steps {
                    if let (Some(listener), Some(item)) =
                        (self.listener.as_deref_mut(), items.last())
                    {
                        listener.step(item);
                    }
                }
            }
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

    /// What [`parse`] makes of it, on this thread or beside it.
    fn ours(text: &str, beside: bool) -> String {
        format!("{:?}", parse_on(text, None, beside).map(|tree| tree.clone()))
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
    fn every_plan_reads_as_marked_yaml_reads_it_on_either_thread() {
        let texts = texts();
        assert!(texts.len() > 100, "only {} texts", texts.len());
        let mut refused = 0;
        for (name, text) in &texts {
            let expected = marked(text);
            refused += usize::from(expected.starts_with("Err"));
            assert_eq!(ours(text, false), expected, "{name}");
            assert_eq!(ours(text, true), expected, "{name}, parsed beside");
        }
        // Both kinds were compared: trees and errors.
        assert!(refused > 15 && refused < texts.len() - 15, "{refused} refused");
    }

    /// A plan large enough to be parsed beside, with an error near its end: the same tree, or
    /// the same first error.
    #[test]
    fn a_large_plan_reads_the_same_and_fails_at_the_same_place() {
        let mut text = "version: 1\ntimezone: UTC\nsteps:\n".to_owned();
        for i in 0..2000 {
            text.push_str(&format!(
                "  - {{at: 2030-01-01 04:00, vm: 'web-{i}', memory: 1GiB, description: \"d\"}}\n"
            ));
        }
        assert!(text.len() >= THREAD_FROM_BYTES);
        assert_eq!(ours(&text, true), marked(&text));
        assert!(marked(&text).starts_with("Ok"));
        for broken in ["  - {vm: a, vm: b}\n", "  - &x {vm: a}\n", "  - {vm: [a\n"] {
            let text = format!("{text}{broken}");
            assert!(marked(&text).starts_with("Err"), "{broken}");
            assert_eq!(ours(&text, true), marked(&text), "{broken}");
        }
    }

    struct Heard {
        before: Vec<String>,
        steps: Vec<String>,
    }

    impl StepListener for Heard {
        fn steps_start(&mut self, before: &MarkedMappingNode) {
            self.before = before.keys().map(|k| k.as_str().to_owned()).collect();
            self.steps.clear();
        }

        fn step(&mut self, item: &Node) {
            let vm = item.as_mapping().and_then(|m| m.get_scalar("vm"));
            self.steps.push(vm.map_or("?", |v| v.as_str()).to_owned());
        }
    }

    #[test]
    fn the_listener_hears_the_top_level_steps_in_order_with_what_came_before() {
        let text = "version: 1\ntimezone: UTC\nother: {steps: [{vm: x}]}\nsteps:\n  - vm: a\n  - {vm: b, nested: {steps: [{vm: y}]}}\n  - [c]\nafter: 1\n";
        for beside in [false, true] {
            let mut heard = Heard {
                before: Vec::new(),
                steps: Vec::new(),
            };
            parse_on(text, Some(&mut heard), beside).unwrap();
            assert_eq!(heard.before, ["version", "timezone", "other"]);
            assert_eq!(heard.steps, ["a", "b", "?"]);
        }
    }
}
