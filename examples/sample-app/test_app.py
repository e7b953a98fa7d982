import unittest

from app import greeting


class GreetingTest(unittest.TestCase):
    def test_greets_by_name(self) -> None:
        self.assertEqual(greeting("Ada"), "Hello, Ada!")  # noqa: PT009 - stdlib unittest in machines

    def test_greeting_ends_with_bang(self) -> None:
        self.assertTrue(greeting("x").endswith("!"))  # noqa: PT009


if __name__ == "__main__":
    unittest.main()
