"""The results table: a Qt model over the ledger's runs of one model, as `core.results` shapes
them (Δ% vs baseline, × smaller, × faster)."""
from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QEvent, QModelIndex, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontMetrics
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QMenu, QTableView

from core.results import COLUMNS, cell

MAX_TEXT_COLUMN = 340  # px
STATUS_COLOURS = {"failed": QColor("#c62828"), "failed check": QColor("#c62828"), "cancelled": QColor("#8d6e63"),
                  "interrupted": QColor("#ef6c00"), "replaced": QColor("#8d8d8d"), "running": QColor("#1565c0")}


# Roles as plain ints: PySide6 resolves `Qt.DisplayRole` through a slow attribute lookup, and data()
# runs for every role of every visible cell at each repaint.
DISPLAY, ALIGN, FOREGROUND, FONT, TOOLTIP, USER = (int(r.value) for r in (
    Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.TextAlignmentRole, Qt.ItemDataRole.ForegroundRole,
    Qt.ItemDataRole.FontRole, Qt.ItemDataRole.ToolTipRole, Qt.ItemDataRole.UserRole))
RIGHT = int((Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter).value)
LEFT = int((Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter).value)
GREY = QColor("#9e9e9e")
RED = QColor("#c62828")


class ResultsModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows: list[dict] = []
        self.eval_key: str | None = None
        self._cells: list[list] = []    # [row][col] display text, computed once per set_rows
        self._colours: list[list] = []  # [row][col] QColor or None
        self._tips: list[str] = []
        self._bold = QFont()
        self._bold.setBold(True)

    def set_rows(self, rows: list[dict], eval_key: str | None = None) -> None:
        self.beginResetModel()
        self.rows, self.eval_key = list(rows), eval_key
        self._cells = [[self._text(r, c) for c in COLUMNS] for r in self.rows]
        self._colours = [[self._colour(r, c) for c in COLUMNS] for r in self.rows]
        self._tips = ["\n".join([r.get("error") or r["label"], *r.get("ran", [])])
                      + ("" if self.comparable(r) else "\n(other eval settings: not on the plot)") for r in self.rows]
        self.endResetModel()

    @staticmethod
    def _text(row: dict, col) -> str:
        if col.key == "label" and row.get("error") and row["status"] != "done":
            # a failed row's numbers are blank and its note column is off-screen: say why beside the recipe
            return f"{row['label']} — {row['error']}"
        return cell(row, col)

    def comparable(self, row: dict) -> bool:
        """Measured under the current eval settings (those are the plot's)."""
        return self.eval_key is None or row.get("eval_key") == self.eval_key

    def _colour(self, row: dict, col) -> QColor | None:
        colour = STATUS_COLOURS.get(row["status"])
        if colour is not None and col.key in ("status", "error"):
            return colour
        if not self.comparable(row):
            return GREY
        if col.key == "delta_ppl_pct" and row.get("delta_ppl_pct") is not None:
            return RED if row["delta_ppl_pct"] > 5 else None
        return None

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=DISPLAY):
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == DISPLAY:
            return COLUMNS[section].header
        if role == TOOLTIP:
            return COLUMNS[section].tip
        return None

    def data(self, index, role=DISPLAY):
        r, c = index.row(), index.column()
        if role == DISPLAY:
            return self._cells[r][c]
        if role == ALIGN:
            return RIGHT if COLUMNS[c].numeric else LEFT
        if role == FOREGROUND:
            return self._colours[r][c]
        if role == FONT:
            return self._bold if self.rows[r]["baseline"] else None
        if role == TOOLTIP:
            return self._tips[r]
        if role == USER:
            return self.rows[r]["id"]
        return None

    def row_of(self, run_id: str | None) -> int:
        return next((i for i, r in enumerate(self.rows) if r["id"] == run_id), -1)


class ResultsTable(QTableView):
    """Emits `selected(run_id or "")` when the user picks a row, `opened(run_id)` on a double click,
    `forget(run_id)` for Delete (the key, or the row's context menu)."""
    selected = Signal(str)
    opened = Signal(str)
    forget = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.results = ResultsModel(self)
        self.setModel(self.results)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setAlternatingRowColors(True)
        self.setWordWrap(False)
        self.verticalHeader().setVisible(False)
        self._row_height()
        h = self.horizontalHeader()
        h.setSectionResizeMode(QHeaderView.Interactive)
        h.setStretchLastSection(True)
        self.selectionModel().selectionChanged.connect(self._changed)
        self.doubleClicked.connect(lambda idx: self.opened.emit(self.results.rows[idx.row()]["id"]))

    def _row_height(self) -> None:
        self.verticalHeader().setDefaultSectionSize(QFontMetrics(self.font()).height() + 6)

    def changeEvent(self, ev) -> None:
        super().changeEvent(ev)
        if ev.type() == QEvent.FontChange:  # teaching mode's larger fonts: rows and columns follow
            self._row_height()
            self.fit_columns()

    def set_rows(self, rows: list[dict], eval_key: str | None = None) -> None:
        keep = self.selected_id()
        self.blockSignals(True)
        self.results.set_rows(rows, eval_key)
        self.blockSignals(False)
        self.fit_columns()
        self.select_id(keep, emit=False)

    def fit_columns(self) -> None:
        """Columns fit their contents; long recipes are cut (the tooltip has them whole). Widths come
        from the cells' text measured directly: Qt's resizeColumnsToContents asks the model for every
        role of every cell and header (10-15 ms here), which a job start or finish cannot spend on the
        GUI thread."""
        bold = QFont(self.font())
        bold.setBold(True)  # the baseline row is bold: measure every cell as if it were
        fm, hfm = QFontMetrics(bold), QFontMetrics(self.horizontalHeader().font())
        m = self.results
        for c, col in enumerate(COLUMNS):
            w = hfm.horizontalAdvance(str(m.headerData(c, Qt.Horizontal))) + 16
            for r in range(m.rowCount()):
                text = m.data(m.index(r, c))
                if text:
                    w = max(w, fm.horizontalAdvance(str(text)) + 12)
            if not col.numeric:
                w = min(w, MAX_TEXT_COLUMN)
            if self.columnWidth(c) != w:
                self.setColumnWidth(c, w)

    def selected_id(self) -> str:
        idx = self.selectionModel().selectedRows()
        return self.results.rows[idx[0].row()]["id"] if idx else ""

    def selected_row(self) -> dict | None:
        i = self.results.row_of(self.selected_id())
        return self.results.rows[i] if i >= 0 else None

    def select_id(self, run_id: str | None, emit: bool = True) -> None:
        i = self.results.row_of(run_id)
        self.blockSignals(not emit)
        if i < 0:
            self.clearSelection()
        else:
            self.selectRow(i)
            self.scrollTo(self.results.index(i, 0))
        self.blockSignals(False)

    def keyPressEvent(self, ev) -> None:
        if ev.key() in (Qt.Key_Delete, Qt.Key_Backspace) and self.selected_id():
            self.forget.emit(self.selected_id())
            return
        super().keyPressEvent(ev)

    def contextMenuEvent(self, ev) -> None:
        i = self.indexAt(ev.pos()).row()
        if i < 0:
            return
        run_id = self.results.rows[i]["id"]
        self.select_id(run_id)
        menu = QMenu(self)
        if not self.results.rows[i].get("export"):
            menu.addAction("Load its recipe (Ctrl+L)", lambda: self.opened.emit(run_id))
        menu.addAction("Delete run…  (Del)", lambda: self.forget.emit(run_id))
        menu.exec(ev.globalPos())

    def _changed(self, *_):
        self.selected.emit(self.selected_id())
