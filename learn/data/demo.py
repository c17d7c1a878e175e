"""The embedded demo dataset: a generated product catalog and shopping sequences (no download).

Catalog: two-level categories, each with its own product types, adjectives, materials, specs and
brands (plus a few adjectives and brands shared by all categories). A title is built from those
words ("Pipetora Autoclavable Micropipette, 100-1000 µl"), so related items share words.

Behaviour: every user prefers 1-3 categories. The next item is drawn mostly from the current
item's neighbourhood -- same product type, then same category, then a complementary category
(pipettes -> pipette tips) -- weighted by a Zipf-like popularity within the category and by how
many title words (brand, adjective, material, spec) the two items share; the rest of the draws
follow the user's preferred categories or are uniform noise. Items never repeat within a user.
So the text of the last item genuinely predicts the next one.

Cold start: ``cold_items`` items are kept out of every training position and appear only as one
of a user's last two items (the valid/test targets under leave-one-out); they follow the same
generative rules, so their text is as predictive as any other item's. Every other item that
appears as a target also appears in some training position (except in toy configs where a user
has already used every item seen in training, e.g. a single user).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from learn.config import ConfigError, DemoConfig
from learn.data.schema import DropReport, RawDataset

DEFAULT_TEMPLATE = "Title: {title}. Brand: {brand}. Category: {category}"

_EPOCH0 = 1_640_995_200  # 2022-01-01 00:00:00 UTC
_SPAN = 2 * 365 * 86_400  # interactions spread over about two years

# next-item mixture: same product type, same category (other type), complementary category,
# one of the user's preferred categories, uniform noise
_MODES = np.array([0.42, 0.18, 0.20, 0.15, 0.05])
_OVERLAP_GAIN = 1.5  # weight multiplier per shared title attribute
_ZIPF = 0.9  # popularity exponent within a category

_SHARED_ADJECTIVES = ("Premium", "Professional", "Compact", "Heavy-Duty", "Classic", "Essential")
_SHARED_BRANDS = ("Northline", "Everwell", "BasicWorks", "Kestrel", "Summit & Co", "Brightfield")


@dataclass(frozen=True)
class _Category:
    top: str
    sub: str
    types: tuple[str, ...]
    adjectives: tuple[str, ...]
    materials: tuple[str, ...]
    specs: tuple[str, ...]
    brands: tuple[str, ...]
    complements: tuple[str, ...]  # ``sub`` names of complementary categories
    price: tuple[float, float]

    @property
    def name(self) -> str:
        return f"{self.top} > {self.sub}"


# Ordered so that the first dozen already holds complementary pairs.
_LIBRARY = (
    _Category("Lab Equipment", "Pipettes",
              ("Micropipette", "Multichannel Pipette", "Pipette Controller", "Electronic Pipette"),
              ("Adjustable", "Autoclavable", "Ergonomic", "Single-Channel", "Fixed-Volume"),
              ("Polypropylene", "PVDF", ""),
              ("0.5-10 µl", "2-20 µl", "20-200 µl", "100-1000 µl", "8-Channel"),
              ("Pipetora", "LabVolt", "Microlux"), ("Pipette Tips", "Tubes & Vials"), (60, 450)),
    _Category("Lab Equipment", "Pipette Tips",
              ("Pipette Tips", "Filter Tips", "Low-Retention Tips", "Tip Refill Rack"),
              ("Sterile", "Filtered", "Graduated", "Universal", "RNase-Free"),
              ("Polypropylene", ""),
              ("10 µl", "200 µl", "1000 µl", "Pack of 96", "Pack of 960"),
              ("Pipetora", "TipWorks", "Microlux"), ("Pipettes", "Tubes & Vials"), (12, 90)),
    _Category("Power Tools", "Drills",
              ("Cordless Drill", "Hammer Drill", "Impact Driver", "Drill Driver Kit"),
              ("Brushless", "Variable-Speed", "Lightweight", "2-Speed", "Cordless"),
              ("", "Magnesium Housing"),
              ("12V", "18V", "20V Max", "1/2-Inch Chuck", "3/8-Inch Chuck"),
              ("Voltline", "Torqmax", "Ironbolt"), ("Drill Bits", "Batteries & Chargers"), (49, 260)),
    _Category("Power Tools", "Drill Bits",
              ("Drill Bit Set", "Masonry Drill Bit", "Screwdriver Bit Set", "Hole Saw Kit", "Spade Bit Set"),
              ("Titanium-Coated", "Cobalt", "Impact-Rated", "Quick-Change", "Magnetic"),
              ("High-Speed Steel", "Carbide", "Black Oxide"),
              ("Pack of 6", "29-Piece", "1/4-Inch Hex", "100-Piece", "5-Piece"),
              ("Torqmax", "Bitcraft", "Ironbolt"), ("Drills", "Saws"), (9, 70)),
    _Category("Kitchen", "Coffee",
              ("Whole Bean Coffee", "Ground Coffee", "Espresso Beans", "Coffee Pods", "Cold Brew Coffee"),
              ("Dark Roast", "Medium Roast", "Light Roast", "Decaf", "Single-Origin"),
              ("Organic", "Fair Trade", ""),
              ("12 oz", "2 lb", "1 kg", "Pack of 24", "Pack of 6"),
              ("Roastwell", "Bean Republic", "Morning Ritual"), ("Coffee Makers",), (8, 45)),
    _Category("Kitchen", "Coffee Makers",
              ("Espresso Machine", "Drip Coffee Maker", "French Press", "Pour-Over Coffee Dripper",
               "Burr Coffee Grinder"),
              ("Programmable", "Thermal", "Manual", "Automatic", "Single-Serve"),
              ("Stainless Steel", "Borosilicate Glass", "Ceramic", ""),
              ("12-Cup", "34 oz", "1 l", "15 Bar", "8-Cup"),
              ("Brewmaster", "Morning Ritual", "Cafetto"), ("Coffee", "Cookware"), (25, 400)),
    _Category("Kitchen", "Cookware",
              ("Frying Pan", "Saucepan", "Dutch Oven", "Stock Pot", "Wok"),
              ("Nonstick", "Induction-Ready", "Oven-Safe", "Pre-Seasoned", "Tri-Ply"),
              ("Cast Iron", "Stainless Steel", "Aluminum", "Carbon Steel"),
              ("8-Inch", "10-Inch", "12-Inch", "5.5 qt", "3-Piece Set"),
              ("Hearthstone", "Chefline", "Copperleaf"), ("Knives & Cutting Boards", "Coffee Makers"), (19, 220)),
    _Category("Kitchen", "Knives & Cutting Boards",
              ("Chef Knife", "Paring Knife", "Santoku Knife", "Knife Block Set", "Cutting Board",
               "Knife Sharpener"),
              ("Forged", "Ultra-Sharp", "Full-Tang", "Ergonomic", "Reversible"),
              ("German Steel", "Damascus Steel", "Bamboo", "Walnut Wood"),
              ("8-Inch", "3.5-Inch", "7-Inch", "15-Piece", "18 x 12 Inch"),
              ("Chefline", "Edgewright", "Kiritsu"), ("Cookware",), (12, 180)),
    _Category("Office", "Printer Supplies",
              ("Ink Cartridge", "Toner Cartridge", "Photo Paper", "Copy Paper", "Label Sheets"),
              ("High-Yield", "Remanufactured", "Glossy", "Matte", "Bright White"),
              ("", "Recycled"),
              ("Pack of 4", "500 Sheets", "Letter Size", "Black", "Tri-Color"),
              ("Printrex", "Inkwell", "PaperMill"), ("Desk Organization",), (7, 95)),
    _Category("Office", "Desk Organization",
              ("Desk Organizer", "File Holder", "Pen Cup", "Monitor Stand", "Drawer Organizer"),
              ("Mesh", "Stackable", "Adjustable", "5-Compartment", "Minimalist"),
              ("Bamboo", "Metal", "Acrylic", "Faux Leather"),
              ("Black", "White", "Pack of 2", "3-Tier", "Large"),
              ("Deskwise", "Tidyworks", "PaperMill"), ("Printer Supplies",), (9, 70)),
    _Category("Outdoors", "Camping Tents",
              ("Dome Tent", "Backpacking Tent", "Tent Footprint", "Camping Tarp", "Cabin Tent"),
              ("Waterproof", "Ultralight", "Instant-Setup", "3-Season", "Freestanding"),
              ("Ripstop Nylon", "Polyester", "Silnylon"),
              ("2-Person", "4-Person", "6-Person", "10 x 10 ft", "1-Person"),
              ("Trailhead", "Summit Gear", "Pinecrest"), ("Sleeping Gear",), (35, 380)),
    _Category("Outdoors", "Sleeping Gear",
              ("Sleeping Bag", "Sleeping Pad", "Camping Pillow", "Sleeping Bag Liner"),
              ("Mummy", "Insulated", "Self-Inflating", "Ultralight", "Packable"),
              ("Down", "Synthetic Fill", "Fleece", "Ripstop Nylon"),
              ("20°F", "30°F", "R-Value 4", "Regular", "Long"),
              ("Trailhead", "Dreamcamp", "Pinecrest"), ("Camping Tents",), (19, 300)),
    _Category("Lab Equipment", "Tubes & Vials",
              ("Microcentrifuge Tube", "Centrifuge Tube", "Cryovial", "PCR Tube Strip"),
              ("Sterile", "Graduated", "Screw-Cap", "Snap-Cap", "Conical"),
              ("Polypropylene", "Borosilicate Glass"),
              ("1.5 ml", "2 ml", "15 ml", "50 ml", "Pack of 500"),
              ("Microlux", "LabVolt", "Cryostore"), ("Pipettes", "Pipette Tips"), (15, 120)),
    _Category("Power Tools", "Batteries & Chargers",
              ("Battery Pack", "Rapid Charger", "Battery Starter Kit", "Dual-Port Charger"),
              ("Lithium-Ion", "High-Capacity", "Fast-Charging", "Compact", "Fuel-Gauge"),
              ("",),
              ("18V 2.0Ah", "20V 5.0Ah", "12V 3.0Ah", "Pack of 2", "20V Max"),
              ("Voltline", "Torqmax", "Ironbolt"), ("Drills", "Saws"), (35, 210)),
    _Category("Power Tools", "Saws",
              ("Circular Saw", "Jigsaw", "Reciprocating Saw", "Miter Saw", "Saw Blade"),
              ("Cordless", "Corded", "Orbital", "Laser-Guided", "Bevel"),
              ("", "Carbide-Tipped"),
              ("7-1/4-Inch", "10-Inch", "15 Amp", "6-1/2-Inch", "24-Tooth"),
              ("Voltline", "Sawtek", "Ironbolt"), ("Batteries & Chargers", "Drill Bits"), (15, 420)),
    _Category("Pet Supplies", "Dog Food",
              ("Dry Dog Food", "Wet Dog Food", "Dog Treats", "Puppy Food", "Dental Chews"),
              ("Grain-Free", "High-Protein", "Limited-Ingredient", "Senior", "Natural"),
              ("Chicken", "Salmon", "Lamb", "Beef"),
              ("5 lb", "30 lb", "Pack of 12", "13 oz Can", "24 oz"),
              ("Pawsome", "Barkley Farms", "Tailwag"), ("Dog Accessories",), (9, 85)),
    _Category("Pet Supplies", "Dog Accessories",
              ("Dog Leash", "Dog Collar", "Dog Harness", "Dog Bed", "Chew Toy"),
              ("Reflective", "No-Pull", "Orthopedic", "Padded", "Durable"),
              ("Nylon", "Leather", "Memory Foam", "Rubber"),
              ("Small", "Medium", "Large", "6 ft", "Pack of 3"),
              ("Pawsome", "Tailwag", "Houndline"), ("Dog Food",), (8, 110)),
    _Category("Electronics", "Headphones",
              ("Wireless Earbuds", "Over-Ear Headphones", "On-Ear Headphones", "Sports Earbuds"),
              ("Noise-Cancelling", "Bluetooth", "Waterproof", "Foldable", "Hi-Res"),
              ("", "Memory Foam"),
              ("40-Hour Battery", "USB-C", "Black", "White", "Bluetooth 5.3"),
              ("Sonique", "Auralink", "Beatwave"), ("Phone Accessories",), (19, 350)),
    _Category("Electronics", "Phone Accessories",
              ("Phone Case", "Screen Protector", "USB-C Cable", "Wall Charger", "Car Mount"),
              ("Shockproof", "Tempered", "Fast-Charging", "Braided", "Magnetic"),
              ("Silicone", "Tempered Glass", "Nylon", "TPU"),
              ("6 ft", "Pack of 2", "20W", "Pack of 3", "3 ft"),
              ("Auralink", "Chargio", "Shieldo"), ("Headphones",), (6, 45)),
    _Category("Garden", "Watering",
              ("Garden Hose", "Hose Nozzle", "Oscillating Sprinkler", "Watering Can", "Hose Reel"),
              ("Expandable", "Kink-Free", "Adjustable", "Heavy-Duty", "Lightweight"),
              ("Rubber", "Brass", "Galvanized Steel", "Plastic"),
              ("50 ft", "100 ft", "2 Gallon", "8-Pattern", "5/8-Inch"),
              ("Greenspray", "Rainmaker", "Yardwise"), ("Watering",), (10, 120)),
)
_QUALIFIERS = ("Pro", "Compact", "Eco", "Travel", "Refurbished", "Kids", "Industrial", "Vintage")


def _choose_categories(n: int) -> list[_Category]:
    """The first ``n`` library categories; past the library, qualified copies ("Drills (Pro)")."""
    chosen = list(_LIBRARY[:n])
    for k in range(n - len(_LIBRARY)):
        base = _LIBRARY[k % len(_LIBRARY)]
        qual = _QUALIFIERS[(k // len(_LIBRARY)) % len(_QUALIFIERS)]
        rnd = k // (len(_LIBRARY) * len(_QUALIFIERS))
        sub = f"{base.sub} ({qual}{'' if rnd == 0 else f' {rnd + 1}'})"
        # a qualified copy is complementary to its base category and to the base's complements
        chosen.append(_Category(base.top, sub, base.types, base.adjectives, base.materials,
                                base.specs, base.brands, (base.sub,) + base.complements, base.price))
    return chosen


def _check(cfg: DemoConfig) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"key 'data.demo.{key}' {why}")

    if cfg.num_categories < 1:
        raise bad("num_categories", f"must be >= 1, got {cfg.num_categories}")
    if cfg.num_items < max(10, 2 * cfg.num_categories):
        raise bad("num_items", f"must be >= max(10, 2 * num_categories), got {cfg.num_items}")
    if cfg.num_users < 1:
        raise bad("num_users", f"must be >= 1, got {cfg.num_users}")
    if not 0 <= cfg.cold_items <= min(cfg.num_items // 2, cfg.num_users):
        raise bad("cold_items", f"must be between 0 and min(num_items // 2, num_users), got {cfg.cold_items}")


class _Catalog:
    """Item attributes as integer codes, plus the table the pipeline reads."""

    def __init__(self, rng: np.random.Generator, cats: list[_Category], n: int):
        c = len(cats)
        # every category gets at least two items; the rest are spread unevenly
        share = rng.dirichlet(np.full(c, 6.0))
        sizes = 2 + rng.multinomial(n - 2 * c, share)
        self.cat = rng.permutation(np.repeat(np.arange(c), sizes))  # ids carry no category order

        words: dict[str, int] = {}
        code = lambda w: words.setdefault(w, len(words))  # noqa: E731
        self.type = np.zeros(n, np.int64)
        self.brand = np.zeros(n, np.int64)
        self.adj = np.zeros(n, np.int64)
        self.mat = np.full(n, -1, np.int64)
        self.spec = np.zeros(n, np.int64)
        self.pop = np.zeros(n)
        titles, brands, prices = [""] * n, [""] * n, [""] * n
        seen: set[str] = set()
        for k, spec in enumerate(cats):
            members = np.flatnonzero(self.cat == k)
            # Zipf-like popularity over a random order of the category's items
            self.pop[members] = 1.0 / (1.0 + rng.permutation(len(members))) ** _ZIPF
            brand_p = np.linspace(2.0, 1.0, len(spec.brands))
            brand_p /= brand_p.sum()
            for i in members:
                for _ in range(10):  # redraw a few times to avoid duplicate titles
                    t = int(rng.integers(len(spec.types)))
                    if rng.random() < 0.25:
                        b = _SHARED_BRANDS[rng.integers(len(_SHARED_BRANDS))]
                    else:
                        b = spec.brands[rng.choice(len(spec.brands), p=brand_p)]
                    if rng.random() < 0.2:
                        a = _SHARED_ADJECTIVES[rng.integers(len(_SHARED_ADJECTIVES))]
                    else:
                        a = spec.adjectives[rng.integers(len(spec.adjectives))]
                    m = spec.materials[rng.integers(len(spec.materials))]
                    s = spec.specs[rng.integers(len(spec.specs))]
                    title = _title(rng, b, a, m, spec.types[t], s)
                    if title not in seen:
                        break
                seen.add(title)
                titles[i], brands[i] = title, b
                self.type[i] = code("type:" + spec.types[t] + "@" + spec.name)
                self.brand[i], self.adj[i], self.spec[i] = code("b:" + b), code("a:" + a), code("s:" + s)
                self.mat[i] = code("m:" + m) if m else -1
                lo, hi = spec.price
                price = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                prices[i] = f"{int(price)}.{(99, 49, 95, 0)[rng.integers(4)]:02d}"
        self.table = pd.DataFrame({
            "item_id": [f"D{i:06d}" for i in range(n)],
            "title": titles,
            "brand": brands,
            "category": [cats[k].name for k in self.cat],
            "price": prices,
        })
        self.members = [np.flatnonzero(self.cat == k) for k in range(c)]
        index = {spec.sub: k for k, spec in enumerate(cats)}
        self.complements = [
            np.array([index[s] for s in spec.complements if s in index and index[s] != k] or [k], np.int64)
            for k, spec in enumerate(cats)
        ]
        self.is_complement = np.zeros((c, c), bool)  # [a, b]: b complements a
        for k, comp in enumerate(self.complements):
            self.is_complement[k, comp] = True

    def overlap(self, i: int, idx: np.ndarray) -> np.ndarray:
        """How many title attributes (brand, adjective, material, spec) each of ``idx`` shares with i."""
        return ((self.brand[idx] == self.brand[i]).astype(np.int64) + (self.adj[idx] == self.adj[i])
                + ((self.mat[idx] == self.mat[i]) & (self.mat[i] >= 0)) + (self.spec[idx] == self.spec[i]))


def _title(rng: np.random.Generator, brand: str, adj: str, mat: str, noun: str, spec: str) -> str:
    core = " ".join(w for w in (adj, mat, noun) if w)
    r = rng.random()
    if r < 0.6:
        return f"{brand} {core}, {spec}"
    if r < 0.85:
        return f"{brand} {noun}, {' '.join(w for w in (adj, mat) if w)}, {spec}"
    return f"{core} by {brand} ({spec})"


class _Walker:
    """Draws next items; keeps per-item neighbourhood weights (computed on first use)."""

    # per drawn mode, the modes to try in order when one has nothing left for this user
    # (0 same type, 1 same category, 2 complement, 3 preferred category, 4 uniform noise)
    _FALLBACKS = ((0, 1, 3), (1, 0, 3), (2, 0, 3), (3, 0), ())

    def __init__(self, cat: _Catalog, rng: np.random.Generator):
        self.c, self.rng = cat, rng
        self.cache: dict[int, tuple] = {}
        self.mode_cdf = np.cumsum(_MODES / _MODES.sum())

    def _neigh(self, i: int) -> tuple:
        got = self.cache.get(i)
        if got is None:
            c = self.c
            same = c.members[c.cat[i]]
            w = c.pop[same] * (1.0 + _OVERLAP_GAIN * c.overlap(i, same))
            is_type = c.type[same] == c.type[i]
            comp = np.concatenate([c.members[k] for k in c.complements[c.cat[i]]])
            # in a complementary category, the same brand is the strongest cue
            wc = c.pop[comp] * (1.0 + 2.0 * (c.brand[comp] == c.brand[i]))
            got = (same[is_type], w[is_type], same[~is_type], w[~is_type], comp, wc)
            self.cache[i] = got
        return got

    def _pick(self, idx: np.ndarray, w: np.ndarray, allowed: np.ndarray) -> int:
        """One of ``idx`` with probability proportional to ``w`` among the allowed; -1 if none."""
        if len(idx) == 0:
            return -1
        cdf = (w * allowed[idx]).cumsum()
        if cdf[-1] <= 0:
            return -1
        return int(idx[min(int(cdf.searchsorted(self.rng.random() * cdf[-1], side="right")), len(idx) - 1)])

    def _preferred(self, prefs: np.ndarray, mix: np.ndarray, allowed: np.ndarray) -> int:
        k = prefs[min(int(mix.cumsum().searchsorted(self.rng.random(), side="right")), len(prefs) - 1)]
        members = self.c.members[k]
        return self._pick(members, self.c.pop[members], allowed)

    def first(self, prefs, mix, allowed) -> int:
        j = self._preferred(prefs, mix, allowed)
        return j if j >= 0 else self.uniform(allowed)

    def next(self, i: int, prefs, mix, allowed) -> int:
        mode = int(self.mode_cdf.searchsorted(self.rng.random(), side="right"))
        t_idx, t_w, s_idx, s_w, c_idx, c_w = self._neigh(i)
        for m in self._FALLBACKS[min(mode, 4)]:
            if m == 0:
                j = self._pick(t_idx, t_w, allowed)
            elif m == 1:
                j = self._pick(s_idx, s_w, allowed)
            elif m == 2:
                j = self._pick(c_idx, c_w, allowed)
            else:
                j = self._preferred(prefs, mix, allowed)
            if j >= 0:
                return j
        return self.uniform(allowed)

    def uniform(self, allowed: np.ndarray) -> int:
        free = np.flatnonzero(allowed)
        return int(free[self.rng.integers(len(free))]) if len(free) else -1


def _lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """5..40 interactions, skewed short (mean about 9)."""
    return np.clip(np.rint(5 + np.exp(rng.normal(1.0, 0.9, n))), 5, 40).astype(np.int64)


def generate_demo(cfg: DemoConfig) -> RawDataset:
    """The embedded demo dataset; the same ``cfg`` (seed included) gives identical tables."""
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    cats = _choose_categories(cfg.num_categories)
    catalog = _Catalog(rng, cats, cfg.num_items)
    n, n_users = cfg.num_items, cfg.num_users

    cold = np.zeros(n, bool)
    cold[rng.choice(n, cfg.cold_items, replace=False)] = True

    # users: 1-3 preferred categories (popular categories more often), Dirichlet mixture over them
    cat_prior = rng.dirichlet(np.full(len(cats), 2.0))
    n_prefs = np.minimum(rng.choice([1, 2, 3], n_users, p=[0.45, 0.35, 0.2]), len(cats))
    # weighted draw without replacement for all users at once (Gumbel top-k)
    keys = np.log(cat_prior) + rng.gumbel(size=(n_users, len(cats)))
    order = np.argsort(-keys, axis=1, kind="stable")
    gam = rng.gamma(1.0, size=(n_users, 3))  # Dirichlet(1, .., 1) = normalised Gamma(1) draws
    prefs = [order[u, :k] for u, k in enumerate(n_prefs)]
    mixes = [gam[u, :k] / gam[u, :k].sum() for u, k in enumerate(n_prefs)]
    # no repeats: a user's training part must fit in the warm catalog with room to spare
    lengths = np.minimum(_lengths(rng, n_users), n - cfg.cold_items)

    walker = _Walker(catalog, rng)
    seqs: list[list[int]] = []
    # pass 1: every position but the last two, never a cold item
    allowed = ~cold  # minus the current user's items so far
    for u in range(n_users):
        seq: list[int] = []
        for _ in range(lengths[u] - 2):
            if seq:
                j = walker.next(seq[-1], prefs[u], mixes[u], allowed)
            else:
                j = walker.first(prefs[u], mixes[u], allowed)
            seq.append(j)
            allowed[j] = False
        allowed[seq] = True
        seqs.append(seq)
    # pass 2: the last two positions may hold cold items, or items already seen in training
    seen = np.zeros(n, bool)
    for seq in seqs:
        seen[seq] = True
    allowed = seen | cold
    for u, seq in enumerate(seqs):
        allowed[seq] = False
        for _ in range(2):
            j = walker.next(seq[-1], prefs[u], mixes[u], allowed)
            if j < 0:  # only in tiny catalogs, where a user has used up every allowed item;
                # lengths leave at least two warm items free, so this always finds one
                spare = ~cold
                spare[seq] = False
                j = walker.uniform(spare)
            seq.append(j)
            allowed[j] = False
        allowed[seq] = (seen | cold)[seq]

    _place_missing_cold(catalog, walker, seqs, cold)

    # timestamps: each user active over a random window of the two years, strictly increasing
    users, items, stamps = [], [], []
    for u, seq in enumerate(seqs):
        start = rng.uniform(0.0, 0.85) * _SPAN
        width = rng.uniform(0.02, 1.0) * (_SPAN - start)
        t = start + np.sort(rng.uniform(0.0, width, len(seq)))
        t = _EPOCH0 + t.astype(np.int64) + np.arange(len(seq))
        users.extend([f"U{u:06d}"] * len(seq))
        items.extend(seq)
        stamps.append(t)
    inter = pd.DataFrame({
        "user_id": users,
        "item_id": catalog.table["item_id"].to_numpy()[np.asarray(items, np.int64)],
        "timestamp": np.concatenate(stamps).astype(np.int64),
    })
    # one global clock: users interleave
    inter = inter.sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)
    return RawDataset(
        name="demo",
        items=catalog.table,
        interactions=inter,
        drops=DropReport(),
        source=f"demo(seed={cfg.seed}, items={n}, users={n_users}, categories={cfg.num_categories})",
        default_template=DEFAULT_TEMPLATE,
    )


def _place_missing_cold(catalog: _Catalog, walker: _Walker, seqs: list[list[int]], cold: np.ndarray) -> None:
    """Make sure every cold item is a target somewhere. One that never came up takes over one of
    the last two slots of the user whose preceding item draws it most strongly (same product type
    and shared words first), so it stays as content-predictable as a naturally drawn one. A slot
    can be taken if it holds a warm item (warm targets always occur in training too) or a cold
    item that is a target elsewhere as well; with cold_items <= num_users one is always left."""
    counts = np.zeros(len(cold), np.int64)
    for seq in seqs:
        counts[seq[-2:]] += 1
    missing = np.flatnonzero(cold & (counts == 0))
    if len(missing) == 0:
        return
    # slots: (user, -1) for every user, then (user, -2); pred = the item just before the slot
    users = np.tile(np.arange(len(seqs)), 2)
    pos = np.repeat([-1, -2], len(seqs))
    item = np.array([seqs[u][p] for u, p in zip(users, pos)], np.int64)
    pred = np.array([seqs[u][p - 1] for u, p in zip(users, pos)], np.int64)
    for c in missing:
        # affinity of each slot's preceding item to c: type > category > complement, then overlap
        aff = (3.0 * (catalog.type[pred] == catalog.type[c]) + 2.0 * (catalog.cat[pred] == catalog.cat[c])
               + 1.0 * catalog.is_complement[catalog.cat[pred], catalog.cat[c]]
               + 0.25 * catalog.overlap(int(c), pred) + 0.5 * (pos == -1))
        # c itself is in no sequence (cold items only ever sit in the last two slots)
        free = ~cold[item] | (counts[item] > 1)
        aff = np.where(free, aff + 0.01 * walker.rng.random(len(aff)), -np.inf)
        k = int(np.argmax(aff))
        if not np.isfinite(aff[k]):  # unreachable while cold_items <= num_users
            raise ConfigError(f"key 'data.demo.cold_items': no target slot left for cold item {c}")
        u, p = users[k], pos[k]
        counts[item[k]] -= 1
        counts[c] += 1
        seqs[u][p] = int(c)
        item[k] = c
        if p == -2:  # the user's last slot now follows c
            pred[k - len(seqs)] = c


def cold_item_ids(ds: RawDataset) -> list[str]:
    """Items in no training position under leave-one-out (only ever among a user's last two items)."""
    inter = ds.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    pos_from_end = inter.groupby("user_id").cumcount(ascending=False)
    trained = set(inter.loc[pos_from_end >= 2, "item_id"])
    return sorted(set(ds.items["item_id"]) - trained)


def write_demo_snapshot(cfg: DemoConfig, out_dir: str | Path, without_cold: bool = False) -> dict[str, int]:
    """The demo dataset as generic files (``items.parquet``, ``interactions.parquet``) in ``out_dir``,
    each written atomically; ``without_cold`` leaves the cold-start items out of the items file, as a
    catalog snapshot taken before they existed (the loader then drops, and counts, the interactions
    on them). Read back with ``data.path=<out_dir>`` (format files)."""
    ds = generate_demo(cfg)
    cold = cold_item_ids(ds)
    items = ds.items[~ds.items["item_id"].isin(cold)] if without_cold else ds.items
    RawDataset(name=ds.name, items=items.reset_index(drop=True), interactions=ds.interactions).write_parquet(out_dir)
    return {"items": len(items), "interactions": len(ds.interactions), "cold_items": len(cold),
            "cold_items_written": 0 if without_cold else len(cold)}
