"""Running a test body on several Python threads at once (tests/test_threads.py, tests/test_derived.py)."""
import threading
from typing import Callable, List


def run_in_threads(body: Callable[[int], None], count: int) -> List[BaseException]:
    """Runs ``body(i)`` for ``i`` in ``range(count)``, each on its own thread, all released at once;
    returns what they raised (a failed assert in a thread would otherwise go unseen by pytest)."""
    errors: List[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            start.wait()
            body(i)
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors
