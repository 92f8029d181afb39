"""awm_fast/logs.py: the "awm_fast" logger prints plain messages on stdout once (installing again adds no second
handler), its records reach caplog, and only_main quiets info lines on non-main ranks for a block only."""
import logging

from awm_fast.logs import ROOT_LOGGER, TqdmStdoutHandler, install_default_handler, only_main

logger = logging.getLogger("awm_fast.tests.logs")


def test_messages_print_plain_on_stdout_once(capsys, caplog):
    caplog.set_level(logging.INFO, logger=ROOT_LOGGER)
    install_default_handler()
    install_default_handler()
    root = logging.getLogger(ROOT_LOGGER)
    assert sum(isinstance(h, TqdmStdoutHandler) for h in root.handlers) == 1
    logger.info("[digits] hello %d", 3)
    logger.warning("[warn] something failed")
    assert capsys.readouterr().out == "[digits] hello 3\n[warn] something failed\n"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "[digits] hello 3"),
                                                                     (logging.WARNING, "[warn] something failed")]


def test_only_main_quiets_info_on_other_ranks_for_the_block(capsys):
    root = logging.getLogger(ROOT_LOGGER)
    before = root.level
    with only_main(False):
        logger.info("[eval] hidden")
        logger.warning("[warn] shown")
    with only_main(True):
        logger.info("[eval] shown on rank 0")
    assert root.level == before
    assert capsys.readouterr().out == "[warn] shown\n[eval] shown on rank 0\n"
