"""Generate the reference seeds `customers.csv` and `products.csv`, deterministically.

    .venv/bin/python dbt_project/seeds/generate_seeds.py

The output depends on nothing but this file (a fixed random seed, no clock), so running it again
rewrites byte-identical CSVs; commit the script and the CSVs together. Ids follow the event
contract: customers cust-0001..cust-0500, products SKU-0001..SKU-0200.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SEED = 20240601
N_CUSTOMERS = 500
N_PRODUCTS = 200
HERE = Path(__file__).resolve().parent

FIRST_NAMES = [
    "Ada",
    "Alan",
    "Alice",
    "Amara",
    "Ana",
    "Ben",
    "Bo",
    "Carla",
    "Chen",
    "Dana",
    "Diego",
    "Elena",
    "Emil",
    "Eva",
    "Farah",
    "Felix",
    "Grace",
    "Hana",
    "Hugo",
    "Ines",
    "Ivan",
    "Jada",
    "Jonas",
    "Kai",
    "Kira",
    "Lars",
    "Lea",
    "Lina",
    "Luca",
    "Maya",
    "Mei",
    "Mila",
    "Nia",
    "Noah",
    "Omar",
    "Olga",
    "Pia",
    "Priya",
    "Quinn",
    "Rafael",
    "Rosa",
    "Sami",
    "Sara",
    "Tariq",
    "Tess",
    "Uma",
    "Vera",
    "Wim",
    "Yara",
    "Yusuf",
    "Zoe",
]
LAST_NAMES = [
    "Abe",
    "Adeyemi",
    "Alvarez",
    "Bauer",
    "Berg",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ito",
    "Jansen",
    "Kaur",
    "Kim",
    "Kowalski",
    "Larsen",
    "Lopez",
    "Martin",
    "Meyer",
    "Moreau",
    "Nakamura",
    "Novak",
    "Okafor",
    "Olsen",
    "Park",
    "Petrov",
    "Rossi",
    "Santos",
    "Schmidt",
    "Silva",
    "Singh",
    "Smith",
    "Suzuki",
    "Tanaka",
    "Torres",
    "Vogel",
    "Wagner",
    "Wong",
    "Yilmaz",
    "Zhang",
]
SEGMENTS = ("consumer", "consumer", "consumer", "small_business", "enterprise")
COUNTRIES = ("US", "US", "DE", "GB", "FR", "NL", "ES", "IT", "SE", "JP", "BR", "CA", "IN", "AU")

CATEGORIES = {
    "apparel": ("T-Shirt", "Hoodie", "Jacket", "Cap", "Socks", "Scarf"),
    "electronics": ("Headphones", "Charger", "Speaker", "Keyboard", "Mouse", "Cable"),
    "home": ("Mug", "Lamp", "Cushion", "Vase", "Blanket", "Candle"),
    "outdoor": ("Tent", "Backpack", "Bottle", "Torch", "Hammock", "Stove"),
    "books": ("Novel", "Cookbook", "Atlas", "Notebook", "Comic", "Guide"),
}
ADJECTIVES = [
    "Classic",
    "Urban",
    "Compact",
    "Deluxe",
    "Eco",
    "Nordic",
    "Retro",
    "Smart",
    "Trail",
    "Everyday",
]
PRICE_RANGE = {
    "apparel": (8, 120),
    "electronics": (10, 400),
    "home": (5, 150),
    "outdoor": (6, 450),
    "books": (4, 60),
}


def customers(rng: random.Random) -> list[dict[str, str]]:
    return [
        {
            "customer_id": f"cust-{n:04d}",
            "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "segment": rng.choice(SEGMENTS),
            "country": rng.choice(COUNTRIES),
        }
        for n in range(1, N_CUSTOMERS + 1)
    ]


def products(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    category_names = sorted(CATEGORIES)
    for n in range(1, N_PRODUCTS + 1):
        category = category_names[(n - 1) % len(category_names)]
        low, high = PRICE_RANGE[category]
        cents = rng.randint(low * 100, high * 100 - 1)
        rows.append(
            {
                "sku": f"SKU-{n:04d}",
                "name": f"{rng.choice(ADJECTIVES)} {rng.choice(CATEGORIES[category])}",
                "category": category,
                "unit_price": f"{cents // 100}.{cents % 100:02d}",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    rng = random.Random(SEED)
    write_csv(HERE / "customers.csv", customers(rng))
    write_csv(HERE / "products.csv", products(rng))


if __name__ == "__main__":
    main()
