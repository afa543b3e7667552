/**
 * Slot names in the seed's memorable form, `delta_<word><number>`, drawn from
 * a cryptographic source so two inits never pick the same name by time.
 * @module
 */

const WORDS = [
  "acorn",
  "amber",
  "anchor",
  "apple",
  "arrow",
  "aspen",
  "badger",
  "basil",
  "beacon",
  "birch",
  "bison",
  "blaze",
  "breeze",
  "brook",
  "cactus",
  "canyon",
  "cedar",
  "cloud",
  "comet",
  "coral",
  "crane",
  "delta",
  "dune",
  "eagle",
  "ember",
  "falcon",
  "fern",
  "fjord",
  "flint",
  "forest",
  "fox",
  "glacier",
  "grove",
  "harbor",
  "hazel",
  "heron",
  "island",
  "ivy",
  "jade",
  "juniper",
  "kestrel",
  "lagoon",
  "lark",
  "lotus",
  "lynx",
  "maple",
  "meadow",
  "mesa",
  "moss",
  "nebula",
  "oak",
  "ocean",
  "orchid",
  "otter",
  "pebble",
  "pine",
  "plume",
  "prairie",
  "quartz",
  "raven",
  "reef",
  "ridge",
  "river",
  "robin",
  "sage",
  "sequoia",
  "sierra",
  "spruce",
  "stone",
  "summit",
  "thistle",
  "tide",
  "tundra",
  "valley",
  "willow",
  "wren",
  "yarrow",
  "zephyr",
];

/** A fresh name `delta_<word><number>`: 78 words × 1,000,000 numbers, drawn at random (init also retries a name that is taken). */
export function generateSlotName(): string {
  const [a, b] = crypto.getRandomValues(new Uint32Array(2));
  return `delta_${WORDS[a % WORDS.length]}${b % 1_000_000}`;
}

/** Whether `name` is a legal replication slot name: lower-case letters, digits, `_`, at most 63 bytes. */
export function isValidSlotName(name: unknown): name is string {
  return typeof name === "string" && /^[a-z0-9_]{1,63}$/.test(name);
}
