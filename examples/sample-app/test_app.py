import os
import unittest
from pathlib import Path

from app import greeting


class GreetingTest(unittest.TestCase):
    def test_greets_by_name(self) -> None:
        self.assertEqual(greeting("Ada"), "Hello, Ada!")  # noqa: PT009 - stdlib unittest in machines

    def test_greeting_ends_with_bang(self) -> None:
        self.assertTrue(greeting("x").endswith("!"))  # noqa: PT009


def _coin() -> bool:
    """Whether the chance test fails this time: each run takes the next letter of the file
    ``SAMPLE_FLAKY_SCRIPT`` names (``F`` fails, anything else passes; none left: pass), so a
    stage that writes the file (e.g. from a seeded random generator) decides the sequence."""
    script = Path(os.environ["SAMPLE_FLAKY_SCRIPT"])
    letters = script.read_text() if script.exists() else ""
    script.write_text(letters[1:])
    return letters[:1] == "F"


class FactoryTest(unittest.TestCase):
    """Tests for the factory's own flaky-test detection, there only when their variable is
    set (the sample's suite stays two tests): ``test_coin`` fails by the script's letters,
    ``test_always_fails`` always."""

    if os.environ.get("SAMPLE_FLAKY_SCRIPT"):

        def test_coin(self) -> None:
            self.assertFalse(_coin(), "the coin came up F")  # noqa: PT009

    if os.environ.get("SAMPLE_BROKEN"):

        def test_always_fails(self) -> None:
            self.assertEqual(greeting("Ada"), "Goodbye, Ada!")  # noqa: PT009


if __name__ == "__main__":
    unittest.main()
